"""ONNX export: parity with torch at several sizes for the full and the cheapest ISR level, metadata,
the runner's dispatch by ISR and its errors, the TorchScript fallback.

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

from models import LADDER, IsrConfig, create_model
from models.export import (
    META_EXPORTER,
    META_ISR,
    META_MODEL,
    META_NUM_CLASSES,
    OnnxParityError,
    check_parity,
    export_onnx,
    read_metadata,
)
from models.onnx_runner import MissingIsrGraphError, OnnxRunner

pytestmark = pytest.mark.slow

FULL, CHEAPEST = LADDER[0].isr, LADDER[-1].isr
# (batch, height, width); none is the export example (2, 256, 320). 100x164 gives 13x21 logits and a
# 4x6 stage-4 grid that 2x2 pooling floors; 96x224 is non-square; every side fits 2222/222 (>= 61).
SIZES = [(1, 128, 128), (1, 96, 224), (1, 100, 164), (2, 64, 96)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("edaformer-t", num_classes=150).eval()


@pytest.fixture(scope="module")
def graphs(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[IsrConfig, object]:
    folder = tmp_path_factory.mktemp("onnx")
    return {isr: export_onnx(model, folder / f"t_{isr.code.replace('/', '-')}.onnx", isr) for isr in (FULL, CHEAPEST)}


@pytest.mark.parametrize("isr", [FULL, CHEAPEST], ids=lambda isr: isr.code)
def test_parity_at_several_sizes(model: torch.nn.Module, graphs: dict, isr: IsrConfig) -> None:
    diffs = check_parity(model, graphs[isr], isr, SIZES)
    assert [size for size, _ in diffs] == SIZES
    assert all(0 <= diff <= 1e-4 for _, diff in diffs), diffs


@pytest.mark.parametrize("isr", [FULL, CHEAPEST], ids=lambda isr: isr.code)
def test_metadata_round_trip(graphs: dict, isr: IsrConfig) -> None:
    meta = read_metadata(graphs[isr])
    assert meta[META_ISR] == isr.code
    assert meta[META_MODEL] == "edaformer-t"
    assert meta[META_NUM_CLASSES] == "150"
    assert meta[META_EXPORTER] == "dynamo"  # the fallback must not be taken silently
    runner = OnnxRunner(graphs[isr])  # ISR read back from the file
    assert runner.isr_configs == [isr]
    assert (runner.model_name, runner.num_classes) == ("edaformer-t", 150)


def test_runner_dispatches_by_isr(model: torch.nn.Module, graphs: dict) -> None:
    runner = OnnxRunner(graphs)
    images = torch.randn(1, 3, 96, 136)
    with torch.inference_mode():
        expected = {isr: model(images, isr=isr) for isr in graphs}
    outputs = {isr: runner(images, isr) for isr in graphs}
    for isr in graphs:
        assert outputs[isr].shape == (1, 150, 12, 17)
        torch.testing.assert_close(outputs[isr], expected[isr], atol=1e-4, rtol=0)
    # The two graphs really compute different ISR settings.
    assert (outputs[FULL] - outputs[CHEAPEST]).abs().max() > 1e-3


def test_runner_is_thread_safe(model: torch.nn.Module, graphs: dict) -> None:
    runner = OnnxRunner(graphs)
    jobs = [(torch.randn(1, 3, 64 + 8 * i, 96), isr) for i in range(4) for isr in graphs]
    with torch.inference_mode():
        expected = [model(images, isr=isr) for images, isr in jobs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda job: runner(*job), jobs))
    for out, ref in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_runner_refuses_an_isr_without_graph(graphs: dict) -> None:
    runner = OnnxRunner(graphs[CHEAPEST])
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(MissingIsrGraphError, match=r"2211/222.*has: 2222/222"):
        runner(images, IsrConfig.parse("2211/222"))
    with pytest.raises(MissingIsrGraphError, match="1111/111"):
        runner(images)  # no ISR means full compute, as for the torch model


def test_runner_refuses_a_mislabelled_graph(graphs: dict) -> None:
    with pytest.raises(ValueError, match="exported with ISR 1111/111, not 2222/222"):
        OnnxRunner({CHEAPEST: graphs[FULL]})
    with pytest.raises(ValueError, match="exported with ISR 2222/222"):
        OnnxRunner(graphs[CHEAPEST], isr=FULL)


def test_parity_check_fails_for_a_different_model(model: torch.nn.Module, graphs: dict) -> None:
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.backbone.block3[4].attn.sr.weight.mul_(1.01)  # a 1% change deep in the encoder
    with pytest.raises(OnnxParityError, match=r"1x100x164: max abs diff"):
        check_parity(changed, graphs[FULL], FULL, [(1, 100, 164)])


def test_parity_check_rejects_sizes_too_small_for_the_isr(model: torch.nn.Module, graphs: dict) -> None:
    with pytest.raises(ValueError, match="too small for ISR 2222/222"):
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
    assert read_metadata(path)[META_ISR] == CHEAPEST.code
    assert all(diff <= 1e-4 for _, diff in check_parity(model, path, CHEAPEST, SIZES[1:]))


def test_export_leaves_the_attention_form_as_it_was(model: torch.nn.Module, graphs: dict) -> None:
    from models.layers import EmbeddingFreeAttention

    # export_onnx switches to the explicit softmax form for the graph and must switch back.
    assert all(m.fused for m in model.modules() if isinstance(m, EmbeddingFreeAttention))
