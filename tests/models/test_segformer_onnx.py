"""ONNX export of SegFormer-B0 at the training setting (1111) and the cheapest ISR level (4421): parity with torch
at several sizes, none of them the export example (2, 256, 320).

The ISR pool is a fixed-kernel `avg_pool2d(p, p)` and the sr conv a fixed-kernel conv, so every other size is
derived from the input's shape at run time. A kernel computed from shapes (or adaptive pooling) would freeze at
the example's size and export silently wrong; parity at odd, non-square sizes where floor-mode pooling drops a
row or column (131x197: stage-1 grid 33x50 -> sr 8 -> 4x6 -> pool 4 -> 1x1) and at batch 2 would catch that.
"""

from __future__ import annotations

import pytest
import torch

from models import create_model
from models.export import META_EXPORTER, META_LEVEL, check_parity, export_onnx, read_metadata
from models.onnx_runner import OnnxRunner

pytestmark = pytest.mark.slow

SIZES_ALL_LEVELS = [(1, 128, 128), (1, 131, 197), (2, 125, 125), (1, 197, 131)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("segformer-b0", num_classes=150).eval()


@pytest.mark.parametrize("index", [0, -1], ids=["training", "cheapest"])
def test_export_parity_at_several_sizes(model, tmp_path, index):
    level = model.spec.ladder()[index]
    path = export_onnx(model, tmp_path / f"segformer_b0_{level.name}.onnx", level)
    meta = read_metadata(path)
    assert (meta[META_LEVEL], meta[META_EXPORTER]) == (level.name, "dynamo")
    diffs = check_parity(model, path, level, SIZES_ALL_LEVELS)
    assert [size for size, _ in diffs] == SIZES_ALL_LEVELS
    assert all(0 <= diff <= 1e-4 for _, diff in diffs), diffs
    runner = OnnxRunner(path)
    images = torch.randn(1, 3, 131, 197)
    with torch.inference_mode():
        expected = model(images, **level.kwargs)
    assert runner(images, **level.kwargs).shape == expected.shape == (1, 150, 33, 50)
