"""LRFormer-T ONNX export: one graph with the pooled size as its scalar `knob` input serves every level; parity
with torch at s16 and s8 at several sizes (landscape, portrait with sides that are not multiples of 32, batch 2),
none of them the export example (2x256x320).

Adaptive pooling exports silently wrong with dynamic shapes (the dynamo exporter freezes the example's bins), so
parity at other sizes and orientations is what proves the matrix pooling and the in-graph pooled sizes right.
The export takes about a minute on 2 cores, so it runs once per module.
"""

from __future__ import annotations

import pytest
import torch

from models import create_model
from models.export import META_RUNTIME_KNOB, check_parity, export_onnx, read_metadata
from models.onnx_runner import OnnxRunner
from tests.models.reference_lrformer import randomize_

pytestmark = pytest.mark.slow

# Landscape; portrait with sides that are not multiples of 32 (126 and 94 mod 32 = 30); a batch of 2.
SIZES = [(1, 96, 160), (1, 126, 94), (2, 64, 64)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(create_model("lrformer-t", num_classes=150), seed=2).eval()


@pytest.fixture(scope="module")
def graph(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "lrformer_t.onnx")


def test_the_pooled_size_is_a_graph_input(graph):
    assert read_metadata(graph)[META_RUNTIME_KNOB] == "pooled_size"
    assert OnnxRunner(graph).levels == []


@pytest.mark.parametrize("level", ["s16", "s8"])
def test_parity_at_several_sizes(model, graph, level):
    """One graph, two levels: the knob input is used (the levels' torch logits differ by > 1e-3 of their std,
    see test_models_lrformer_parity), and the pooled sizes follow each input's shape and orientation."""
    diffs = check_parity(model, graph, model.spec.level(level), SIZES)
    assert [size for size, _ in diffs] == SIZES
    assert all(0 <= diff <= 1e-4 for _, diff in diffs), diffs
