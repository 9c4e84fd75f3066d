"""ONNX export of DoViT-S: one graph for every exit threshold (a scalar `knob` input), kept fractions as an
extra output, dynamic batch, height and width; parity with torch at several sizes and thresholds.

The kept count is data dependent, so the dynamo exporter must keep it symbolic (`.item()` + `torch._check`);
the legacy exporter would bake the example's count in (spec 3.2), so it is never used as a fallback. Weights
are randomized with sharpened aux heads, so tokens really stop on these inputs (asserted). Exported once per
module (tens of seconds on 2 cores).
"""

from __future__ import annotations

import math

import pytest
import torch

from models import create_model
from models.export import META_EXPORTER, META_LEVEL, META_RUNTIME_KNOB, check_parity, export_onnx, read_metadata
from models.onnx_runner import OnnxRunner
from tests.models.reference_dovit import randomize_, structured_images

pytestmark = pytest.mark.slow

# (batch, height, width): none is the export example (2, 256, 320); non-square, sides that are not multiples of
# 16 (7x9 and 5x7 token grids), batch 2 (images with different kept counts: padded and masked).
SIZES = [(1, 100, 130), (2, 72, 104), (1, 64, 160)]
THRESHOLDS = [0.96, 0.9, math.inf]  # training, cheapest ladder level, dense


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(create_model("dovit-s", num_classes=150), seed=1, aux_scale=30.0).eval()


@pytest.fixture(scope="module")
def graph(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "dovit_s.onnx")


def test_one_graph_with_the_threshold_as_input(graph) -> None:
    meta = read_metadata(graph)
    assert meta[META_RUNTIME_KNOB] == "exit_threshold" and meta[META_LEVEL] == ""
    assert meta[META_EXPORTER] == "dynamo"
    runner = OnnxRunner(graph)
    assert runner.levels == []  # no baked-in level: every threshold runs on this graph
    session = next(iter(runner._sessions.values()))
    assert [i.name for i in session.get_inputs()] == ["images", "knob"]
    assert [o.name for o in session.get_outputs()] == ["logits", "stats_kept_fraction"]


@pytest.mark.parametrize("threshold", THRESHOLDS, ids=["t0.96", "t0.9", "dense"])
def test_parity_at_several_sizes(model, graph, threshold) -> None:
    level = model.spec.knob.level(threshold)
    diffs = check_parity(model, graph, level, SIZES)  # also compares the kept fractions (atol 1e-6)
    assert [size for size, _ in diffs] == SIZES
    assert all(0 <= diff <= 1e-4 for _, diff in diffs), diffs


def test_kept_counts_equal_where_tokens_stop(model, graph) -> None:
    """On structured images, where a different number of tokens stops in each image of the batch."""
    runner = OnnxRunner(graph)
    images = structured_images(2, 72, 104, seed=11)
    for threshold in THRESHOLDS[:2]:
        with torch.inference_mode():
            expected, expected_stats = model.forward_with_stats(images, exit_threshold=threshold)
        logits, stats = runner.forward_with_stats(images, exit_threshold=threshold)
        kept = stats["kept_fraction"]
        assert ((kept > 0) & (kept < 1)).any() and not torch.equal(kept[0], kept[1])
        assert torch.equal(kept, expected_stats["kept_fraction"])
        assert float((logits - expected).abs().max()) <= 1e-4 * float(expected.std())
    assert torch.equal(runner(images, exit_threshold=(0.9, 0.9, 0.9)), logits)  # one value for every tap
    with pytest.raises(ValueError, match="one exit_threshold value for every tap"):
        runner(images, exit_threshold=(0.96, 0.93, 0.9))
    with pytest.raises(TypeError, match="no knob exit_floor"):
        runner(images, exit_floor=0.02)  # the graph takes the threshold only


def test_unresized_pos_embed_case_exports(model, graph) -> None:
    """256x1024 gives a 16x64 grid: 1024 tokens like the 32x32 training grid, so mmseg adds the table unresized.
    The graph selects that case at run time (no shape branch was traced)."""
    diffs = check_parity(model, graph, model.spec.training_level(), [(1, 256, 1024)])
    assert diffs[0][1] <= 1e-4


def test_no_torchscript_fallback(model, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torch.export cannot trace this")

    monkeypatch.setattr("models.export._export_dynamo", broken)
    with pytest.raises(RuntimeError, match="cannot trace"):
        export_onnx(model, tmp_path / "ts.onnx")
    assert not (tmp_path / "ts.onnx").exists()
