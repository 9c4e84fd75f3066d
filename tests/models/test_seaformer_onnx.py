"""ONNX export of SeaFormer-T (knob-less: one `base` graph with dynamic batch, height and width).

The 1-D positional tables are resized to each axis length of the input, and the fusion gates to the detail
feature's size: a length frozen at the export example (2, 256, 320) would break every other size. So parity is
checked at several sizes, square and not, none a multiple of 32, most not of 8, and batch 2. Weights are random
with BatchNorm statistics calibrated on structured and noise images (random statistics collapse the logits).
"""

from __future__ import annotations

import copy

import pytest
import torch

from models import BASE_LEVEL, create_model
from models.export import (
    META_EXPORTER,
    META_KNOB,
    META_LEVEL,
    META_MODEL,
    OnnxParityError,
    check_parity,
    export_onnx,
    read_metadata,
)
from models.onnx_runner import OnnxRunner
from tests.models.reference_seaformer import calibrate_batchnorm_, randomize_, structured_images

pytestmark = pytest.mark.slow

# (batch, height, width); none is the export example. 33x47 has 1x1 grids at strides 32 and 64.
SIZES = [(1, 128, 128), (1, 96, 224), (1, 100, 164), (2, 65, 97), (1, 33, 47)]
TOLERANCE = 1e-4  # max |d| / std of the logits


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_(create_model("seaformer-t", num_classes=150), seed=1)
    noise = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(9))
    return calibrate_batchnorm_(model, torch.cat([structured_images(2, 256, 256, seed=7), noise]))


@pytest.fixture(scope="module")
def graph(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "seaformer_t_base.onnx")


def test_parity_at_several_sizes(model: torch.nn.Module, graph) -> None:
    diffs = check_parity(model, graph, BASE_LEVEL, SIZES)
    assert [size for size, _ in diffs] == SIZES
    assert all(0 <= diff <= TOLERANCE for _, diff in diffs), diffs


def test_parity_at_the_spec_sizes(model: torch.nn.Module, graph) -> None:
    diffs = check_parity(model, graph)  # the spec's parity_sizes, up to 384x640
    assert len(diffs) == len(model.spec.parity_sizes)


def test_mean_difference_on_structured_images(model: torch.nn.Module, graph) -> None:
    runner = OnnxRunner(graph)
    for batch, height, width in [(2, 65, 97), (1, 201, 333)]:
        images = structured_images(batch, height, width, seed=height)
        with torch.inference_mode():
            expected = model(images)
        actual = runner(images)
        assert actual.shape == expected.shape
        scale = float(expected.std())
        assert float((actual - expected).abs().max()) / scale <= TOLERANCE
        assert float((actual - expected).abs().mean()) / scale <= 1e-5


def test_metadata_and_runner(graph) -> None:
    meta = read_metadata(graph)
    assert (meta[META_LEVEL], meta[META_KNOB], meta[META_MODEL]) == ("base", "", "seaformer-t")
    assert meta[META_EXPORTER] == "dynamo"  # the fallback must not be taken silently
    runner = OnnxRunner(graph)
    assert runner.levels == [BASE_LEVEL]
    assert runner(torch.randn(1, 3, 50, 70)).shape == (1, 150, 7, 9)


def test_parity_check_fails_for_a_different_model(model: torch.nn.Module, graph) -> None:
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.backbone.trans1.transformer_blocks[0].attn.pos_emb_rowq.pos_embed.mul_(1.01)
    with pytest.raises(OnnxParityError, match=r"1x100x164: max \|diff\| / std"):
        check_parity(changed, graph, BASE_LEVEL, [(1, 100, 164)])
