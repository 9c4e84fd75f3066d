"""SeaFormer: the registry entries and their spec, the state dict against the official listings, parity with an
independent spec-literal forward, spatial structure of the test weights, thread safety and GMACs.

Spec: /work/shared/specs/seaformer.md (§6 supersedes). Official listings: tests/data/listings/seaformer-*.txt.
Only SeaFormer-T computes at more than a tiny size; the larger variants are built on the meta device, except for
one tiny forward each against the reference.
"""

from __future__ import annotations

import copy
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from models import BASE_LEVEL, create_model, get_spec, list_models
from models.flops import count_gmacs
from models.layers.seaformer_blocks import SqueezeAxialPositionalEmbedding
from tests.models.listings import meta_model, read_listing
from tests.models.reference_seaformer import calibrate_batchnorm_, randomize_, reference_forward, structured_images

# Spec §6 / the brief: entries per official listing (150 classes), and GMACs at 512x512 through the head.
LISTING_LENGTHS = {"seaformer-t": 458, "seaformer-s": 590, "seaformer-b": 722, "seaformer-l": 806}
SPEC_GMACS_512 = {"seaformer-t": 0.563, "seaformer-s": 1.031, "seaformer-b": 1.758, "seaformer-l": 6.340}
# Spec §1.4 (T [run]; S and B by the same formula; L from the README's 14.0 M): parameters with conv_seg, in M.
SPEC_PARAMS_M = {"seaformer-t": 1.667, "seaformer-s": 3.99, "seaformer-b": 8.61, "seaformer-l": 14.0}
NUM_CLASSES = 19
# (batch, height, width): none a multiple of 8 except the first (whose batch is 2); 33x47 gives 1x1 at stride 64.
SIZES = [(2, 64, 64), (1, 65, 97), (1, 101, 75), (2, 33, 47), (1, 130, 150)]
MAX_REL, MEAN_REL = 1e-4, 1e-5  # of the logits' std (the brief's fidelity bounds)

VARIANTS = list_models(family="seaformer")


def _test_model(name: str, seed: int, side: int = 256) -> torch.nn.Module:
    """Random weights whose BN statistics come from one train-mode pass (spec §6): structured images so that the
    features vary over space, plus noise images like the ones parity checks feed, so that no channel's variance
    is tiny for them (that would amplify float32 rounding far beyond trained weights')."""
    torch.manual_seed(seed)
    model = randomize_(create_model(name, num_classes=NUM_CLASSES), seed=seed + 1)
    noise = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed + 2))
    return calibrate_batchnorm_(model, torch.cat([structured_images(2, side, side, seed=seed + 3), noise]))


@pytest.fixture(scope="module")
def model_t() -> torch.nn.Module:
    return _test_model("seaformer-t", seed=0)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |d|, mean |d|) relative to the std of the expected logits."""
    scale = float(expected.std())
    diff = (actual.double() - expected.double()).abs()
    return float(diff.max()) / scale, float(diff.mean()) / scale


# --- registry and spec ---------------------------------------------------------------------------------


def test_four_variants_are_registered_without_a_knob():
    assert VARIANTS == ["seaformer-b", "seaformer-l", "seaformer-s", "seaformer-t"]
    for name in VARIANTS:
        spec = get_spec(name)
        assert (spec.family, spec.output_stride, spec.knob) == ("seaformer", 8, None)
        assert spec.ladder() == (BASE_LEVEL,) and spec.training_level().kwargs == {}
        assert spec.checkpoint.classifier_key == "decode_head.conv_seg.weight"
        assert spec.checkpoint.unused_prefixes == ()
        assert spec.reference_gmacs_512 == SPEC_GMACS_512[name]
        assert any(h % 32 for _, h, _ in spec.parity_sizes) and any(b == 2 for b, _, _ in spec.parity_sizes)
        with pytest.raises(KeyError, match="no compute knob"):
            spec.level("2211/222")


def test_published_miou_and_pipelines_follow_the_official_configs():
    assert {name: get_spec(name).published_miou.get("ade20k") for name in VARIANTS} == {
        "seaformer-t": 36.5, "seaformer-s": 39.5, "seaformer-b": 41.9, "seaformer-l": 43.8}
    assert get_spec("seaformer-s").published_miou["cityscapes"] == 76.4
    assert get_spec("seaformer-b").published_miou["cityscapes"] == 77.7
    spec = get_spec("seaformer-t")
    assert spec.pipeline_overrides("ade20k") == {"resize_scale": (2048, 512), "align_to": 32, "test_mode": "whole"}
    city = spec.pipeline_overrides("cityscapes")
    assert (city["resize_scale"], city["align_to"], city["test_mode"]) == ((2048, 1024), None, "whole")


# --- state dict ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_equals_official_listing_in_order(name):
    listing = read_listing(name)
    assert len(listing) == LISTING_LENGTHS[name]
    ours = [(key, tuple(t.shape)) for key, t in meta_model(name).state_dict().items()]
    assert ours == listing  # names, shapes and order; conv_seg included (it is the classifier)


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count_matches_spec(name):
    count = sum(p.numel() for p in meta_model(name).parameters()) / 1e6
    assert count == pytest.approx(SPEC_PARAMS_M[name], rel=5e-3)


def test_only_conv_seg_depends_on_the_class_count():
    listing = read_listing("seaformer-t")
    ours = [(key, tuple(t.shape)) for key, t in meta_model("seaformer-t", 19).state_dict().items()]
    assert [k for k, _ in ours] == [k for k, _ in listing]
    differing = {key for (key, a), (_, b) in zip(ours, listing, strict=True) if a != b}
    assert differing == {"decode_head.conv_seg.weight", "decode_head.conv_seg.bias"}


# --- fidelity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=[f"{b}x{h}x{w}" for b, h, w in SIZES])
def test_t_matches_reference(model_t, size):
    batch, height, width = size
    images = structured_images(batch, height, width, seed=height + width)
    with torch.inference_mode():
        ours = model_t(images)
    expected = reference_forward(model_t.state_dict(), images, "seaformer-t")
    assert ours.shape == expected.shape == (batch, NUM_CLASSES, math.ceil(height / 8), math.ceil(width / 8))
    max_rel, mean_rel = _rel(ours, expected)
    assert max_rel <= MAX_REL and mean_rel <= MEAN_REL, (max_rel, mean_rel)


def test_t_matches_reference_in_float64(model_t):
    """In float64 rounding cannot hide a small error (e.g. an interpolation off by align_corners)."""
    model = copy.deepcopy(model_t).double()
    images = structured_images(2, 65, 97, seed=1).double()
    with torch.inference_mode():
        ours = model(images)
    assert _rel(ours, reference_forward(model.state_dict(), images, "seaformer-t"))[0] < 1e-10


@pytest.mark.parametrize("name", ["seaformer-s", "seaformer-b", "seaformer-l"])
def test_larger_variants_match_reference_at_a_tiny_size(name):
    model = _test_model(name, seed=5, side=96)  # a small calibration pass: one tiny forward is the budget
    images = structured_images(1, 41, 57, seed=2)
    with torch.inference_mode():
        ours = model(images)
    expected = reference_forward(model.state_dict(), images, name)
    assert ours.shape == (1, NUM_CLASSES, 6, 8)
    max_rel, mean_rel = _rel(ours, expected)
    assert max_rel <= MAX_REL and mean_rel <= MEAN_REL, (max_rel, mean_rel)


def test_positional_tables_matter_beyond_tolerance(model_t, monkeypatch):
    """Guards the parity test's power: positional tables resized another way (align_corners=True) move the
    logits far beyond the bounds."""
    images = structured_images(1, 101, 75, seed=4)
    with torch.inference_mode():
        expected = model_t(images)

    def aligned(self: SqueezeAxialPositionalEmbedding, x: torch.Tensor) -> torch.Tensor:
        return x + F.interpolate(self.pos_embed, size=x.shape[-1], mode="linear", align_corners=True)

    monkeypatch.setattr(SqueezeAxialPositionalEmbedding, "forward", aligned)
    with torch.inference_mode():
        changed = model_t(images)
    assert _rel(changed, expected)[0] > 1e-3


def test_random_test_weights_keep_spatial_structure(model_t):
    """Random BN statistics collapse the argmax map to one class (spec §6); calibrated statistics must not."""
    images = structured_images(1, 128, 160, seed=8)
    with torch.inference_mode():
        labels = model_t(images).argmax(1)
        uncalibrated = randomize_(create_model("seaformer-t", num_classes=NUM_CLASSES), seed=1)
        for name, buffer in uncalibrated.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.3, 2.0, generator=torch.Generator().manual_seed(0))
        collapsed = uncalibrated.eval()(images).argmax(1)
    assert labels.unique().numel() >= 5
    assert collapsed.unique().numel() <= 2  # what the calibration exists to avoid


def test_each_image_is_independent_of_the_batch(model_t):
    noise = torch.randn(2, 3, 65, 97, generator=torch.Generator().manual_seed(3))
    images = torch.cat([structured_images(1, 65, 97, seed=1), noise])
    with torch.inference_mode():
        together = model_t(images)
        alone = torch.cat([model_t(images[i : i + 1]) for i in range(3)])
    assert _rel(together, alone)[0] < 1e-5


def test_concurrent_calls_are_thread_safe(model_t):
    """Different inputs (sizes and batches) from several threads at once give their single-threaded results."""
    inputs = [structured_images(1, 64, 96, seed=1), structured_images(2, 72, 56, seed=2)]
    with torch.inference_mode():
        single = [model_t(x) for x in inputs]
    barrier = threading.Barrier(4)

    def task(i: int) -> tuple[int, torch.Tensor]:
        which = i % 2
        if i < 4:
            barrier.wait(timeout=30)
        with torch.inference_mode():
            return which, model_t(inputs[which])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(task, range(12)))
    for which, logits in results:
        assert torch.equal(logits, single[which])


# --- GMACs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_gmacs_at_512_match_spec(name):
    assert count_gmacs(meta_model(name), 512, 512) == pytest.approx(SPEC_GMACS_512[name], rel=2e-3)


def test_gmacs_grow_linearly_with_pixels():
    """Spec §1.4 [run], T with 150 classes: 1.12 GMACs at 512x1024 and 4.49 at 1024x2048."""
    model = meta_model("seaformer-t")
    assert count_gmacs(model, 512, 1024) == pytest.approx(1.12, abs=0.01)
    assert count_gmacs(model, 1024, 2048) == pytest.approx(4.49, abs=0.02)
