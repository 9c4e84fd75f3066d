"""The CUDA paths (run only with a GPU: `pytest -m gpu`): every family's torch model on CUDA against CPU fp32,
the service's torch backend at fp32/bf16/fp16, and ONNX Runtime's CUDA execution provider.

TF32 is switched off for the fp32 comparisons: PyTorch lets cuDNN convolutions use TF32 by default, whose 10-bit
mantissa would measure the hardware setting rather than the model's arithmetic. The bound is 1e-4 x std of the
logits (issue 14); reduced precision is judged by the full-resolution mask's pixel agreement.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from models import create_model, list_models
from models.datasets import dataset_for
from models.predict import pipeline_for
from service.calibration import calibration_images
from service.workers.backends.torch_backend import TorchBackend

pytestmark = pytest.mark.gpu
SMALLEST = ["edaformer-t", "segformer-b0", "seaformer-t", "lrformer-t", "dovit-s"]


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("name", [n for n in SMALLEST if n in list_models()])
def test_every_family_on_cuda_matches_cpu_fp32(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    images = torch.randn(2, 3, 256, 320, generator=torch.Generator().manual_seed(1))
    cuda = copy.deepcopy(model).cuda()
    for level in (model.spec.ladder()[0], model.spec.ladder()[-1]):
        with torch.inference_mode(), no_tf32():
            expected = model(images, **level.kwargs)
            actual = cuda(images.cuda(), **level.kwargs).cpu()
        diff = float((actual - expected).abs().max() / expected.std())
        assert diff <= 1e-4, (name, level.name, diff)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_torch_backend_on_cuda_agrees_with_cpu(precision: str) -> None:
    torch.manual_seed(0)
    model = create_model("edaformer-t").eval()
    pipeline = pipeline_for(model.spec, dataset_for("ade20k"))
    cpu = TorchBackend(model, pipeline, "cpu")
    cuda = TorchBackend(copy.deepcopy(model), pipeline, "cuda")  # the backend moves its module to the device
    pixels = calibration_images(2, 250, 300)
    level, shape, sizes = model.spec.ladder()[0], (256, 320), [(250, 300)] * 2
    with no_tf32():
        reference = cpu.run(pixels, shape, level, sizes)
        output = cuda.run(pixels, shape, level, sizes, precision)
    bound = 0.999 if precision == "fp32" else 0.98  # fp32: only float near-ties may differ
    for cpu_labels, cuda_labels in zip(reference.labels, output.labels, strict=True):
        assert cpu_labels.shape == cuda_labels.shape
        assert float((cpu_labels == cuda_labels).mean()) > bound, precision


def test_onnx_runtime_cuda_provider_matches_cpu(tmp_path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)")
    from models.export import export_onnx
    from models.onnx_runner import OnnxRunner

    torch.manual_seed(0)
    model = create_model("edaformer-t").eval()
    path = export_onnx(model, tmp_path / "t.onnx")
    images = torch.randn(1, 3, 256, 320)
    cpu = OnnxRunner(path)(images)
    gpu = OnnxRunner(path, providers="cuda")(images)
    assert float((gpu - cpu).abs().max() / cpu.std()) <= 1e-3  # cuDNN's algorithms differ from MLAS in rounding
    assert np.array_equal(gpu.argmax(1).numpy(), cpu.argmax(1).numpy()) or (
        (gpu.argmax(1) == cpu.argmax(1)).float().mean() > 0.999)
