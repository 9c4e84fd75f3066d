"""ONNX export (EDAFormer): parity with torch at several sizes for the full and the cheapest ISR level,
metadata, the runner's dispatch by level and its errors, the TorchScript fallback.

Pooling kernels derived from shapes, or adaptive pooling, export silently wrong: the kernel freezes at
the example's size. So parity is checked at sizes other than the export example, non-square, not
multiples of 32 (odd stride-8 and stride-32 grids, where floor-mode pooling drops a row) and batch 2.
Each export of EDAFormer-T takes tens of seconds on 2 cores, so the graphs are exported once per module.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging

import pytest
import torch

from models import LADDER, Level, create_model
from models.export import (
    META_EXPORTER,
    META_LEVEL,
    META_MODEL,
    META_NUM_CLASSES,
    OnnxParityError,
    check_parity,
    export_onnx,
    read_metadata,
)
from models.onnx_runner import MissingLevelGraphError, OnnxRunner

pytestmark = pytest.mark.slow

FULL, CHEAPEST = LADDER[0], LADDER[-1]
# (batch, height, width); none is the export example (2, 256, 320). 100x164 gives 13x21 logits and a
# 4x6 stage-4 grid that 2x2 pooling floors; 96x224 is non-square; every side fits 2222/222 (>= 61).
SIZES = [(1, 128, 128), (1, 96, 224), (1, 100, 164), (2, 64, 96)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("edaformer-t", num_classes=150).eval()


@pytest.fixture(scope="module")
def graphs(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[Level, object]:
    folder = tmp_path_factory.mktemp("onnx")
    return {level: export_onnx(model, folder / f"t_{level.name}.onnx", level) for level in (FULL, CHEAPEST)}


@pytest.mark.parametrize("level", [FULL, CHEAPEST], ids=lambda level: level.name)
def test_parity_at_several_sizes(model: torch.nn.Module, graphs: dict, level: Level) -> None:
    diffs = check_parity(model, graphs[level], level, SIZES)
    assert [size for size, _ in diffs] == SIZES
    assert all(0 <= diff <= 1e-4 for _, diff in diffs), diffs


@pytest.mark.parametrize("level", [FULL, CHEAPEST], ids=lambda level: level.name)
def test_metadata_round_trip(graphs: dict, level: Level) -> None:
    meta = read_metadata(graphs[level])
    assert meta[META_LEVEL] == level.name
    assert meta[META_MODEL] == "edaformer-t"
    assert meta[META_NUM_CLASSES] == "150"
    assert meta[META_EXPORTER] == "dynamo"  # the fallback must not be taken silently
    runner = OnnxRunner(graphs[level])  # level read back from the file
    assert runner.levels == [level]
    assert (runner.model_name, runner.num_classes) == ("edaformer-t", 150)


def test_runner_dispatches_by_level(model: torch.nn.Module, graphs: dict) -> None:
    runner = OnnxRunner(graphs.values())
    images = torch.randn(1, 3, 96, 136)
    with torch.inference_mode():
        expected = {level: model(images, **level.kwargs) for level in graphs}
    outputs = {level: runner(images, **level.kwargs) for level in graphs}
    for level in graphs:
        assert outputs[level].shape == (1, 150, 12, 17)
        torch.testing.assert_close(outputs[level], expected[level], atol=1e-4, rtol=0)
    # The two graphs really compute different ISR settings.
    assert (outputs[FULL] - outputs[CHEAPEST]).abs().max() > 1e-3


def test_runner_is_thread_safe(model: torch.nn.Module, graphs: dict) -> None:
    runner = OnnxRunner(graphs.values())
    jobs = [(torch.randn(1, 3, 64 + 8 * i, 96), level) for i in range(4) for level in graphs]
    with torch.inference_mode():
        expected = [model(images, **level.kwargs) for images, level in jobs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda job: runner(job[0], **job[1].kwargs), jobs))
    for out, ref in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_runner_refuses_a_level_without_graph(graphs: dict) -> None:
    runner = OnnxRunner(graphs[CHEAPEST])
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(MissingLevelGraphError, match=r"2211-222.*has: 2222-222"):
        runner(images, **LADDER[3].kwargs)
    with pytest.raises(MissingLevelGraphError, match="1111-111"):
        runner(images)  # no knob means full compute, as for the torch model
    with pytest.raises(TypeError, match="no knob pooled_size"):
        runner(images, pooled_size=8)


def test_runner_refuses_a_graph_without_metadata(graphs: dict, tmp_path) -> None:
    import onnx

    proto = onnx.load(str(graphs[FULL]))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="no segserve metadata"):
        OnnxRunner(tmp_path / "bare.onnx")


def test_parity_check_fails_for_a_different_model(model: torch.nn.Module, graphs: dict) -> None:
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.backbone.block3[4].attn.sr.weight.mul_(1.01)  # a 1% change deep in the encoder
    with pytest.raises(OnnxParityError, match=r"1x100x164: max \|diff\| / std"):
        check_parity(changed, graphs[FULL], FULL, [(1, 100, 164)])


def test_parity_check_rejects_sizes_too_small_for_the_level(model: torch.nn.Module, graphs: dict) -> None:
    with pytest.raises(ValueError, match="too small for edaformer-t at level 2222-222"):
        check_parity(model, graphs[CHEAPEST], CHEAPEST, [(48, 48)])


def test_torchscript_fallback_is_logged_and_correct(
    model: torch.nn.Module, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torch.export cannot trace this")

    monkeypatch.setattr("models.export._export_dynamo", broken)
    with caplog.at_level(logging.WARNING, logger="models.export"):
        path = export_onnx(model, tmp_path / "ts.onnx", CHEAPEST)
    assert "falling back to the TorchScript exporter" in caplog.text
    assert "torch.export cannot trace this" in caplog.text
    assert read_metadata(path)[META_EXPORTER] == "torchscript"
    assert read_metadata(path)[META_LEVEL] == CHEAPEST.name
    assert all(diff <= 1e-4 for _, diff in check_parity(model, path, CHEAPEST, SIZES[1:]))


def test_export_leaves_the_attention_form_as_it_was(model: torch.nn.Module, graphs: dict) -> None:
    from models.layers import EmbeddingFreeAttention

    # export_onnx switches to the explicit softmax form for the graph and must switch back.
    assert all(m.fused for m in model.modules() if isinstance(m, EmbeddingFreeAttention))
