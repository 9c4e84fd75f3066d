"""SegFormer on CUDA (runs only with a GPU): fp32 equals the spec-literal reference (computed in float64 on the CPU)
at the training and ISR levels, at an odd, non-square size and batch 2; fp16 autocast keeps the argmax.

TF32 is switched off for the fp32 comparison: PyTorch lets cuDNN convolutions use TF32 by default, whose 10-bit
mantissa would measure the hardware setting rather than the model's arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from models import create_model
from tests.models.reference_segformer import randomize_, reference_forward

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(create_model("segformer-b0", num_classes=19), seed=1).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 250, 322, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("index", [0, 2, -1], ids=["1111", "2211", "4421"])
def test_cuda_fp32_and_fp16_match_the_reference(model, images, index):
    level = model.spec.ladder()[index]
    state64 = {key: value.double() for key, value in model.state_dict().items()}
    expected = reference_forward(state64, images.double(), level.isr.encoder).float()
    cuda_model = create_model("segformer-b0", num_classes=19).eval().cuda()
    cuda_model.load_state_dict(model.state_dict())
    conv_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            fp32 = cuda_model(images.cuda(), **level.kwargs).cpu()
            with torch.autocast("cuda", dtype=torch.float16):
                fp16 = cuda_model(images.cuda(), **level.kwargs).float().cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv_tf32, matmul_tf32
    scale = float(expected.std())
    max_diff, mean_diff = float((fp32 - expected).abs().max()) / scale, float((fp32 - expected).abs().mean()) / scale
    print(f"{level.name}: fp32 max {max_diff:.2e} mean {mean_diff:.2e} x std;", end=" ")
    assert max_diff <= 3e-5 and mean_diff <= 1.5e-6, (max_diff, mean_diff)
    agreement = float((fp16.argmax(1) == expected.argmax(1)).float().mean())
    print(f"fp16 max {float((fp16 - expected).abs().max()) / scale:.2e} x std, argmax agreement {agreement:.4f}")
    assert agreement > 0.98
