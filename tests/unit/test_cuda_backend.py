"""The CUDA path of the torch backend computes the same masks as the CPU path (runs only with a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from models import LADDER, create_model
from models.datasets import dataset_for
from service.workers.backends.torch_backend import TorchBackend

pytestmark = pytest.mark.gpu


def test_cuda_backend_matches_cpu() -> None:
    torch.manual_seed(0)
    model = create_model("edaformer-t").eval()
    dataset = dataset_for("ade20k")
    images = torch.randn(2, 3, 256, 320)
    cpu = TorchBackend(model, dataset, "cpu")
    cuda = TorchBackend(copy.deepcopy(model), dataset, "cuda")  # the backend moves its module to the device
    sizes = [(250, 300), (256, 320)]
    for level in (LADDER[0], LADDER[-1]):
        torch.testing.assert_close(cuda.logits(images, level.isr), cpu.logits(images, level.isr), atol=1e-3, rtol=1e-3)
        cpu_out, cuda_out = cpu.run(images, level.isr, sizes), cuda.run(images, level.isr, sizes)
        for cpu_labels, cuda_labels in zip(cpu_out.labels, cuda_out.labels, strict=True):
            assert cpu_labels.shape == cuda_labels.shape
            assert (cpu_labels == cuda_labels).mean() > 0.999  # only float near-ties may differ
