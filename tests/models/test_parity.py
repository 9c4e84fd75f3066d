"""Parity of `create_model` with an independent re-implementation of the EDAFormer forward.

The reference (`tests/models/reference_edaformer.py`) is written from the spec pseudocode
(/work/shared/specs/edaformer.md) with functional ops only and reads the weights from the state dict.
Weights are randomized, BatchNorm running statistics included, so that every parameter matters.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from models import LADDER, IsrConfig, create_model
from tests.models.reference_edaformer import randomize_, reference_forward

LADDER_CODES = [level.isr.code for level in LADDER]
# Every ladder level fits 61x61 and up; 4211/222 (encoder pool 32 at stride 4) needs a side >= 125.
SMALL_SIZES = [(64, 64), (64, 96), (72, 100)]  # square, non-square, not a multiple of 32 (nor of 8)
LARGE_SIZES = [(128, 128), (128, 160), (130, 150)]
CASES = [(code, size) for code in LADDER_CODES for size in SMALL_SIZES] + [("4211/222", s) for s in LARGE_SIZES]


def _max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference relative to the logit scale (max |expected|)."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _images(height: int, width: int, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed + height * 1000 + width)
    return torch.randn(batch, 3, height, width, generator=generator, dtype=dtype)


@pytest.fixture(scope="module")
def model_t():
    torch.manual_seed(0)
    return randomize_(create_model("edaformer-t", num_classes=19), seed=1).eval()


@pytest.fixture(scope="module")
def model_b():
    torch.manual_seed(0)
    return randomize_(create_model("edaformer-b", num_classes=19), seed=2).eval()


def test_randomized_weights_are_non_trivial(model_t):
    sd = model_t.state_dict()
    assert not torch.allclose(sd["decode_head.linear_fuse.bn.running_mean"], torch.zeros(128))
    assert not torch.allclose(sd["decode_head.linear_fuse.bn.running_var"], torch.ones(128))
    assert not torch.allclose(sd["backbone.norm1.weight"], torch.ones(32))
    assert not torch.allclose(sd["decode_head.attn2.attn.norm.bias"], torch.zeros(64))


@pytest.mark.parametrize(("code", "size"), CASES, ids=[f"{c}-{h}x{w}" for c, (h, w) in CASES])
def test_t_matches_reference(model_t, code, size):
    isr = IsrConfig.parse(code)
    batch = 2 if size[0] == size[1] else 1
    images = _images(*size, batch=batch)
    with torch.inference_mode():
        ours = model_t(images, isr=isr)
    expected = reference_forward(model_t.state_dict(), images, isr.encoder, isr.decoder)
    assert ours.shape == expected.shape == (batch, 19, -(-size[0] // 8), -(-size[1] // 8))
    assert _max_rel_diff(ours, expected) < 1e-5, code


def test_isr_levels_differ_far_beyond_tolerance(model_t):
    """Guards the parity test's power: a model that ignored one ISR number would be caught."""
    images = _images(72, 100)
    with torch.inference_mode():
        outputs = {code: model_t(images, isr=IsrConfig.parse(code)) for code in LADDER_CODES}
    for i, a in enumerate(LADDER_CODES):
        for b in LADDER_CODES[i + 1 :]:
            assert _max_rel_diff(outputs[a], outputs[b]) > 1e-3, (a, b)


@pytest.mark.parametrize("code", ["1111/111", "2222/222"])
def test_t_matches_reference_in_float64(model_t, code):
    """In float64 the two implementations agree to ~1e-15; this catches what float32 tolerance would hide
    (e.g. LayerNorm eps 1e-6 vs 1e-5 moves the logits by ~4e-6 of their scale)."""
    model = copy.deepcopy(model_t).double()
    isr = IsrConfig.parse(code)
    images = _images(72, 100, dtype=torch.float64)
    with torch.inference_mode():
        ours = model(images, isr=isr)
    expected = reference_forward(model.state_dict(), images, isr.encoder, isr.decoder)
    assert _max_rel_diff(ours, expected) < 1e-10


@pytest.mark.parametrize(("code", "size"), [("1111/111", (64, 64)), ("2211/222", (64, 96))])
def test_b_matches_reference_at_tiny_sizes(model_b, code, size):
    isr = IsrConfig.parse(code)
    images = _images(*size)
    with torch.inference_mode():
        ours = model_b(images, isr=isr)
    expected = reference_forward(model_b.state_dict(), images, isr.encoder, isr.decoder)
    assert ours.shape == (1, 19, size[0] // 8, size[1] // 8)
    assert _max_rel_diff(ours, expected) < 1e-5


def test_fused_attention_is_the_default_and_calls_sdpa(model_t, monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    images = _images(64, 64)
    with torch.inference_mode():
        model_t(images)
    assert len(calls) == 2 + 2 + 10 + 2 + 6  # one per attention: 16 encoder blocks, 6 decoder blocks
    calls.clear()
    explicit = copy.deepcopy(model_t).set_fused_attention(False)
    with torch.inference_mode():
        explicit(images)
    assert calls == []


@pytest.mark.parametrize("code", [*LADDER_CODES, "4211/222"])
def test_fused_attention_equals_explicit_softmax(model_t, code):
    isr = IsrConfig.parse(code)
    images = _images(*((130, 150) if code == "4211/222" else (72, 100)))
    explicit = copy.deepcopy(model_t).set_fused_attention(False)
    with torch.inference_mode():
        fused_out = model_t(images, isr=isr)
        explicit_out = explicit(images, isr=isr)
    assert _max_rel_diff(fused_out, explicit_out) < 1e-5


def test_concurrent_isr_settings_are_thread_safe(model_t):
    """Two ISR settings run from several threads at once on one model give their single-threaded results."""
    settings = [IsrConfig(), IsrConfig.parse("2222/222")]
    images = _images(64, 96)
    with torch.inference_mode():
        single = [model_t(images, isr=isr) for isr in settings]
    assert _max_rel_diff(single[0], single[1]) > 1e-3  # the settings really differ

    n_tasks = 12
    barrier = threading.Barrier(4)

    def task(i: int) -> tuple[int, torch.Tensor]:
        which = i % 2
        if i < 4:
            barrier.wait(timeout=30)  # the first wave starts together
        with torch.inference_mode():
            return which, model_t(images, isr=settings[which])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(task, range(n_tasks)))
    for which, logits in results:
        assert _max_rel_diff(logits, single[which]) < 1e-6
