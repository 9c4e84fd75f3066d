"""SegFormer B0-B5 with ISR: registry and spec, state dicts against the official listings, the ISR knob (ladder,
validity rule), parity with the spec-literal reference, thread safety, GMACs against the spec tables, Predictor.

Spec: /work/shared/specs/segformer.md (§1 architecture, §2 ISR, §2.4 GMACs, §3 layouts, §6 verified facts).
Compute runs on SegFormer-B0 at small sizes only; the larger variants are built on the meta device.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import IsrConfig, create_model, get_spec, list_models
from models.checkpoint import official_checkpoint
from models.datasets import DATASETS
from models.flops import count_gmacs
from models.predict import Predictor, pipeline_for, slide_windows
from tests.models.listings import meta_model, read_listing
from tests.models.reference_segformer import randomize_, reference_forward

VARIANTS = list_models(family="segformer")
LADDER = get_spec("segformer-b0").ladder()
CONV_SEG = ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias")
# spec §1.1 "total, 150 cls, no conv_seg (= HF)" and the listing lengths (§3.1, with conv_seg).
PARAMS_WITHOUT_CONV_SEG = {"segformer-b0": 3_752_694, "segformer-b1": 13_715_798, "segformer-b2": 27_461_974,
                           "segformer-b3": 47_337_814, "segformer-b4": 64_108_374, "segformer-b5": 84_708_694}
LISTING_LENGTHS = {"segformer-b0": 194, "segformer-b1": 194, "segformer-b2": 350, "segformer-b3": 590,
                   "segformer-b4": 850, "segformer-b5": 1070}
# spec §6: minimum square input per setting (every stage keeps >= 1 K/V token).
MIN_SIDE = {"1111": 29, "2111": 61, "2211": 61, "2221": 61, "4421": 125}
# Fidelity bounds (fp32 CPU), relative to the std of the reference logits.
MAX_BOUND, MEAN_BOUND = 3e-5, 1.5e-6
# (batch, height, width): a square batch of 2 and a non-square, odd size (not multiples of 32) per level; 4421
# needs sides >= 125, the others >= 61.
PARITY_SIZES = {"small": [(2, 64, 64), (1, 75, 99)], "large": [(2, 125, 125), (1, 131, 197)]}
PARITY_CASES = [(level.name, size) for level in LADDER
                for size in PARITY_SIZES["large" if level.name == "4421" else "small"]]
# The explicit-softmax switch (the official arithmetic, used for exports) at the training and cheapest levels.
EXPLICIT_CASES = [case for case in PARITY_CASES if case[0] in ("1111", "4421")]


def _images(batch: int, height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * height + width)
    return torch.randn(batch, 3, height, width, generator=generator, dtype=dtype)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |d|, mean |d|) relative to the std of the expected logits."""
    diff = (actual - expected).abs()
    scale = float(expected.std())
    return float(diff.max()) / scale, float(diff.mean()) / scale


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(create_model("segformer-b0", num_classes=19), seed=1).eval()


# --- registry, spec, state dicts ---------------------------------------------------------------------------


def test_all_six_variants_are_registered_with_their_spec():
    assert list_models(family="segformer") == [f"segformer-b{i}" for i in range(6)]
    for name in VARIANTS:
        spec = get_spec(name)
        assert (spec.family, spec.output_stride, spec.stats) == ("segformer", 4, ())
        assert [level.name for level in spec.ladder()] == ["1111", "2111", "2211", "2221", "4421"]
        assert all(level.isr.decoder == (1, 1, 1) for level in spec.ladder())
        assert spec.checkpoint.classifier_key == "decode_head.linear_pred.weight"
        assert spec.checkpoint.unused_in_channels == 128
        assert set(spec.published_miou) == {"ade20k", "cityscapes"}


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_equals_official_listing_in_order(name):
    listing = read_listing(name)
    assert len(listing) == LISTING_LENGTHS[name]
    ours = [(key, tuple(t.shape)) for key, t in meta_model(name).state_dict().items()]
    assert ours == [entry for entry in listing if entry[0] not in CONV_SEG]  # names, shapes and order
    assert sum(p.numel() for p in meta_model(name).parameters()) == PARAMS_WITHOUT_CONV_SEG[name]
    checkpoint = official_checkpoint(meta_model(name), [], [])
    assert {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()} == dict(listing)  # with conv_seg


@pytest.mark.parametrize("name", VARIANTS)
def test_only_the_classifier_depends_on_the_class_count(name):
    expected = [(key, (19, *shape[1:]) if key.startswith("decode_head.linear_pred.") else shape)
                for key, shape in read_listing(name) if key not in CONV_SEG]
    assert [(key, tuple(t.shape)) for key, t in meta_model(name, 19).state_dict().items()] == expected


def test_pipelines_follow_the_official_configs():
    for name in VARIANTS:
        spec = get_spec(name)
        ade = pipeline_for(spec, DATASETS["ade20k"])
        assert (ade.test_mode, ade.align_to) == ("whole", 32)
        assert ade.resize_scale == ((2048, 640) if name == "segformer-b5" else (2048, 512))
        coco = pipeline_for(spec, DATASETS["coco-stuff"])
        assert (coco.test_mode, coco.resize_scale, coco.align_to) == ("whole", (2048, 512), 32)
        city = pipeline_for(spec, DATASETS["cityscapes"])
        assert (city.test_mode, city.resize_scale, city.align_to) == ("slide", (2048, 1024), None)
        assert (city.slide_crop, city.slide_stride) == ((1024, 1024), (768, 768))


# --- the ISR knob --------------------------------------------------------------------------------------------


def test_knob_parses_encoder_codes_and_refuses_decoder_ratios(model):
    spec = get_spec("segformer-b0")
    assert spec.level("2211").isr == IsrConfig(encoder=(2, 2, 1, 1))
    assert spec.level("2211/111").name == "2211"
    with pytest.raises(ValueError, match="111"):
        spec.knob.parse("2211/222")
    with pytest.raises(ValueError, match="decoder ratios must be 111"):
        model(_images(1, 64, 64), isr=IsrConfig(decoder=(2, 2, 2)))


@pytest.mark.parametrize("level", LADDER, ids=lambda level: level.name)
def test_validity_rule_gives_the_spec_minimum_sides_and_is_exact(model, level):
    spec, side = get_spec("segformer-b0"), MIN_SIDE[level.name]
    assert spec.fits(level, side, side) and spec.fits(level, side, 4 * side)
    assert not spec.fits(level, side - 1, side) and not spec.fits(level, side, side - 1)
    with torch.inference_mode():
        logits = model(_images(1, side, side + 2), **level.kwargs)
        assert logits.shape == (1, 19, -(-side // 4), -(-(side + 2) // 4))
        assert torch.isfinite(logits).all()
        with pytest.raises(RuntimeError):  # one pixel less leaves a stage without K/V tokens
            model(_images(1, side - 1, side), **level.kwargs)


def test_stage_4_is_never_pooled_and_every_other_digit_matters(model):
    images = _images(1, 131, 197)
    with torch.inference_mode():
        out = {code: model(images, isr=IsrConfig.parse(code + "/111"))
               for code in ("1111", "2111", "2211", "2221", "4421", "2212", "1112")}
    assert torch.equal(out["2212"], out["2211"]) and torch.equal(out["1112"], out["1111"])
    for a, b in itertools.combinations(("1111", "2111", "2211", "2221", "4421"), 2):
        assert _rel(out[a], out[b])[0] > 1e-3, (a, b)  # far beyond the parity bounds


# --- fidelity -----------------------------------------------------------------------------------------------


CASES = [(True, *case) for case in PARITY_CASES] + [(False, *case) for case in EXPLICIT_CASES]


@pytest.mark.parametrize(("fused", "code", "size"), CASES,
                         ids=[f"{'sdpa' if f else 'explicit'}-{c}-{b}x{h}x{w}" for f, c, (b, h, w) in CASES])
def test_matches_the_reference(model, fused, code, size):
    batch, height, width = size
    level = get_spec("segformer-b0").level(code)
    images = _images(batch, height, width)
    subject = model if fused else copy.deepcopy(model).set_fused_attention(False)
    with torch.inference_mode():
        ours = subject(images, **level.kwargs)
    expected = reference_forward(model.state_dict(), images, level.isr.encoder)
    assert ours.shape == expected.shape == (batch, 19, -(-height // 4), -(-width // 4))
    max_diff, mean_diff = _rel(ours, expected)
    assert max_diff <= MAX_BOUND and mean_diff <= MEAN_BOUND, (max_diff, mean_diff)


@pytest.mark.parametrize("code", ["1111", "4421"])
def test_matches_the_reference_in_float64(model, code):
    """fp32 noise (~1e-5 x std, spec §6) is as large as the effect of a wrong LayerNorm eps (1e-5 vs 1e-6);
    in float64 the two implementations agree to ~1e-15, so an eps or op-order mistake cannot hide."""
    double = copy.deepcopy(model).double()
    isr = get_spec("segformer-b0").level(code).isr
    images = _images(1, *((125, 131) if code == "4421" else (72, 100)), dtype=torch.float64)
    with torch.inference_mode():
        ours = double(images, isr=isr)
    assert _rel(ours, reference_forward(double.state_dict(), images, isr.encoder))[0] < 1e-10


def test_random_weights_keep_spatial_structure(model):
    with torch.inference_mode():
        labels = model(_images(1, 131, 197)).argmax(dim=1)
    assert labels.unique().numel() >= 5
    sd = model.state_dict()
    assert not torch.allclose(sd["decode_head.linear_fuse.bn.running_var"], torch.ones(256))
    assert not torch.allclose(sd["backbone.block1.0.attn.norm.weight"], torch.ones(32))


def test_each_image_of_a_batch_is_independent(model):
    images = _images(2, 75, 99)
    with torch.inference_mode():
        together = model(images, isr=IsrConfig.parse("2211/111"))
        alone = [model(images[i : i + 1], isr=IsrConfig.parse("2211/111")) for i in range(2)]
    for i in range(2):
        assert _rel(together[i : i + 1], alone[i])[0] < 1e-5


def test_sdpa_is_the_default_and_explicit_softmax_is_a_switch(model, monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.inference_mode():
        model(_images(1, 64, 64))
        assert len(calls) == 8  # one per block of B0
        calls.clear()
        copy.deepcopy(model).set_fused_attention(False)(_images(1, 64, 64))
    assert calls == []


def test_concurrent_isr_settings_are_thread_safe(model):
    settings = [level.isr for level in (LADDER[0], LADDER[-1])]
    images = _images(1, 131, 197)
    with torch.inference_mode():
        single = [model(images, isr=isr) for isr in settings]
    assert _rel(single[0], single[1])[0] > 1e-3
    barrier = threading.Barrier(4)

    def task(i: int) -> tuple[int, torch.Tensor]:
        if i < 4:
            barrier.wait(timeout=30)  # the first wave starts together
        with torch.inference_mode():
            return i % 2, model(images, isr=settings[i % 2])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(task, range(12)))
    for which, logits in results:
        assert _rel(logits, single[which])[0] < 1e-6


# --- GMACs (spec §2.4, counted on the official module tree; torch column) -----------------------------------

SPEC_GMACS = {
    (512, 512, 150): {
        "segformer-b0": {"1111": 8.388, "2111": 7.984, "2211": 7.780, "2221": 7.634, "4421": 7.482, "4211": 7.679},
        "segformer-b1": {"1111": 15.878, "2211": 14.654},
        "segformer-b2": {"1111": 62.338, "2111": 61.125, "2211": 60.295, "2221": 59.304, "4421": 58.793},
        "segformer-b3": {"1111": 78.963, "2211": 76.920},
        "segformer-b4": {"1111": 95.567, "2211": 92.694},
        "segformer-b5": {"1111": 111.510, "2211": 109.052},
    },
    (640, 640, 150): {"segformer-b5": {"1111": 183.141, "2211": 177.177}},
    (1024, 1024, 19): {"segformer-b0": {"1111": 43.84, "2211": 34.16, "2221": 32.06, "4421": 29.64}},
    (1024, 2048, 19): {
        "segformer-b0": {"1111": 120.96, "2211": 82.27, "2221": 74.06, "4211": 75.83, "4421": 64.39},
        "segformer-b2": {"1111": 703.49, "2211": 574.40, "2221": 524.19, "4421": 491.92},
        "segformer-b5": {"1111": 1446.37},
    },
}
GMAC_CASES = [(name, shape, code, value) for shape, rows in SPEC_GMACS.items()
              for name, values in rows.items() for code, value in values.items()]


@cache
def _gmacs(name: str, height: int, width: int, num_classes: int, code: str) -> float:
    return count_gmacs(meta_model(name, num_classes), height, width, isr=IsrConfig.parse(code + "/111"))


@pytest.mark.parametrize(("name", "shape", "code", "expected"), GMAC_CASES,
                         ids=[f"{n}-{h}x{w}-{c}" for n, (h, w, _), c, _ in GMAC_CASES])
def test_gmacs_match_the_spec_table(name, shape, code, expected):
    assert _gmacs(name, *shape, code) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("name", ["segformer-b0", "segformer-b2"])
@pytest.mark.parametrize("shape", [(512, 512, 150), (1024, 2048, 19)])
def test_ladder_is_strictly_cheaper_step_by_step(name, shape):
    values = [_gmacs(name, *shape, level.name) for level in get_spec(name).ladder()]
    assert all(a > b for a, b in itertools.pairwise(values)), values


def test_reference_gmacs_512_are_the_training_setting():
    for name in VARIANTS:
        assert get_spec(name).reference_gmacs_512 == pytest.approx(_gmacs(name, 512, 512, 150, "1111"), rel=1e-3)


# --- prediction through the official pipelines --------------------------------------------------------------


def test_predictor_whole_image_on_an_odd_size(model):
    image = np.random.default_rng(0).integers(0, 256, size=(61, 93, 3), dtype=np.uint8)
    pipeline = pipeline_for(model.spec, DATASETS["ade20k"])
    prediction = Predictor(model, pipeline).predict(image, model.spec.level("2211"), scale=0.25)
    assert prediction.labels.shape == (61, 93)
    assert prediction.input_size == (128, 224)  # keep-ratio into (512, 128), then aligned to 32
    assert len(np.unique(prediction.labels)) > 1


def test_predictor_sliding_window_on_an_odd_size(model):
    image = np.random.default_rng(1).integers(0, 256, size=(101, 203, 3), dtype=np.uint8)
    pipeline = pipeline_for(model.spec, DATASETS["cityscapes"])
    assert pipeline.test_mode == "slide"
    prediction = Predictor(model, pipeline).predict(image, scale=0.125)  # (256, 128): one clamped window
    assert prediction.labels.shape == (101, 203)
    # The same slide code with windows small enough to overlap (the official 1024 crops are too slow here).
    small = dataclasses.replace(pipeline, slide_crop=(128, 128), slide_stride=(96, 96))
    assert Predictor(model, small).input_size(101, 203, 0.125) == (127, 256)
    assert len(slide_windows(127, 256, (128, 128), (96, 96))) == 3  # x = 0, 96 and 128 (clamped)
    prediction = Predictor(model, small).predict(image, model.spec.level("4421"), scale=0.125)
    assert prediction.labels.shape == (101, 203)
    assert len(np.unique(prediction.labels)) > 1
