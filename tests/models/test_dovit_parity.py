"""Parity of `create_model("dovit-*")` with the spec-literal reference (`tests/models/reference_dovit.py`).

The reference runs the official recipe image by image with a rebuild after every block; the model pads a
batch to its largest kept count and masks the padding. Weights are randomized and the aux classifiers
sharpened, so that tokens really stop (asserted) and every code path of the token pass runs. Bounds (brief):
max |d| <= 3e-4 x std and mean |d| <= 5e-5 x std of the logits; kept-token counts exactly equal. The Segmenter
head's final LayerNorm over near-equal class scores amplifies fp32 rounding (spec section 6), hence the looser
bound than other families'; measured here about 2e-5 x std.
"""

from __future__ import annotations

import copy
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from models import create_model, get_spec, list_models
from tests.models.reference_dovit import randomize_, reference_forward, structured_images

SPEC = get_spec("dovit-s")
LEVELS = [*SPEC.ladder(), SPEC.knob.level(math.inf)]  # t0.96 (training), t0.93, t0.9, and dense
# (batch, height, width): non-square, not multiples of 16 (7x9 and 5x7 token grids), batch 2.
SIZES = [(1, 100, 130), (2, 72, 104)]
CASES = [(level, size) for level in LEVELS for size in SIZES]
MAX_BOUND, MEAN_BOUND = 3e-4, 5e-5
AUX_SCALE = 30.0  # sharpens the aux softmax: random heads become confident on part of the tokens


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    scale = float(expected.std())
    diff = (actual - expected).abs()
    return float(diff.max()) / scale, float(diff.mean()) / scale


def _kept_counts(stats: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    return (stats["kept_fraction"] * math.ceil(height / 16) * math.ceil(width / 16)).round().long()


@pytest.fixture(scope="module")
def model_s() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(create_model("dovit-s", num_classes=150), seed=1, aux_scale=AUX_SCALE).eval()


@pytest.mark.parametrize(("level", "size"), CASES, ids=[f"{lv.name}-{b}x{h}x{w}" for lv, (b, h, w) in CASES])
def test_s_matches_reference(model_s, level, size):
    batch, height, width = size
    images = structured_images(batch, height, width)
    with torch.inference_mode():
        ours, stats = model_s.forward_with_stats(images, **level.kwargs)
    expected, kept = reference_forward(model_s.state_dict(), images, level.value)
    assert ours.shape == expected.shape == (batch, 150, math.ceil(height / 16), math.ceil(width / 16))
    assert torch.equal(_kept_counts(stats, height, width), kept)
    max_rel, mean_rel = _relative(ours, expected)
    assert max_rel <= MAX_BOUND and mean_rel <= MEAN_BOUND, (max_rel, mean_rel)
    assert ours.argmax(dim=1).unique().numel() >= 5  # random weights that keep spatial structure


def test_token_pass_really_runs(model_s):
    """Guards the parity tests' power: tokens stop at every tap, fewer at lower thresholds, and it matters."""
    images = structured_images(1, 100, 130)
    with torch.inference_mode():
        results = {level.name: model_s.forward_with_stats(images, **level.kwargs) for level in LEVELS}
    kept = {name: stats["kept_fraction"][0] for name, (_, stats) in results.items()}
    assert torch.equal(kept["dense"], torch.ones(3))
    training = kept[SPEC.training_level().name]
    assert (training > 0).all() and (training < 1).all()
    assert all(bool((a[1:] <= a[:-1]).all()) for a in kept.values())  # monotone over taps
    ladder = [kept[level.name] for level in SPEC.ladder()]
    assert all(bool((cheap <= rich).all()) for rich, cheap in itertools.pairwise(ladder))
    assert bool((ladder[-1] < ladder[0]).any())
    dense, trained = results["dense"][0], results[SPEC.training_level().name][0]
    assert _relative(trained, dense)[0] > 1e-2


def test_default_is_the_training_threshold(model_s):
    images = structured_images(1, 64, 96)
    with torch.inference_mode():
        assert torch.equal(model_s(images), model_s(images, exit_threshold=0.96))
        assert torch.equal(model_s(images, exit_threshold=math.inf), model_s(images, exit_threshold=1.5))


def test_batch_images_get_their_single_image_results(model_s):
    """No batch-mean shortcut: each image keeps its own tokens, whatever else is in the batch."""
    images = structured_images(3, 80, 112, seed=4)
    with torch.inference_mode():
        batched, stats = model_s.forward_with_stats(images)
        singles = [model_s.forward_with_stats(images[i:i + 1]) for i in range(3)]
    counts = _kept_counts(stats, 80, 112)
    assert len({tuple(row.tolist()) for row in counts}) > 1  # different kept counts: the padding path ran
    for i, (logits, single_stats) in enumerate(singles):
        assert torch.equal(counts[i], _kept_counts(single_stats, 80, 112)[0])
        assert _relative(batched[i:i + 1], logits)[0] <= MAX_BOUND / 3  # fp32 noise of other GEMM shapes


def test_per_tap_thresholds_summary_boundary_and_exit_floor_match_reference(model_s):
    images = structured_images(1, 72, 104, seed=2)
    sd = model_s.state_dict()
    # 0.999 stops under 10% of the sequence at taps 1-2 (no summary token) and 10-20% at tap 3 (summary).
    cases = ({"exit_threshold": (0.96, 0.955, 0.95)}, {"exit_threshold": 0.999},
             {"exit_threshold": 0.96, "exit_floor": 0.4})
    for kwargs in cases:
        with torch.inference_mode():
            ours, stats = model_s.forward_with_stats(images, **kwargs)
        expected, kept = reference_forward(sd, images, kwargs["exit_threshold"], kwargs.get("exit_floor"))
        assert torch.equal(_kept_counts(stats, 72, 104), kept), kwargs
        assert _relative(ours, expected)[0] <= MAX_BOUND, kwargs
    with torch.inference_mode():
        _, no_floor = model_s.forward_with_stats(images, exit_threshold=math.inf)
        _, floor_only = model_s.forward_with_stats(images, exit_threshold=math.inf, exit_floor=0.4)
    assert torch.equal(no_floor["kept_fraction"], torch.ones(1, 3))
    assert bool((floor_only["kept_fraction"] < 1).any())  # the floor alone stops unconfident tokens


def test_bad_thresholds_are_refused(model_s):
    images = structured_images(1, 32, 32)
    with pytest.raises(ValueError, match="one per aux tap"):
        model_s(images, exit_threshold=(0.9, 0.9))
    with pytest.raises(ValueError, match="one per aux tap"):
        model_s(images, exit_threshold=torch.tensor([0.9, 0.9]))


def test_s_matches_reference_in_float64(model_s):
    """In float64 the two agree to ~1e-12; this catches what the float32 bound would hide (LayerNorm eps 1e-6
    vs 1e-5 in the head, scale placement, the summary token's weights)."""
    model = copy.deepcopy(model_s).double()
    images = structured_images(2, 72, 104, seed=3, dtype=torch.float64)
    with torch.inference_mode():
        ours, stats = model.forward_with_stats(images)
    expected, kept = reference_forward(model.state_dict(), images, 0.96)
    assert torch.equal(_kept_counts(stats, 72, 104), kept)
    assert _relative(ours, expected)[0] < 1e-9


def test_pos_embed_resize_follows_mmseg():
    """mmseg resizes pos_embed only when the token COUNT differs from the training grid's: with a 128 px
    training size (8x8 grid), a 4x16 grid (64 tokens) takes the table unresized; 4x15 and 8x8 are resized
    (8x8 exactly to itself, bicubic at scale 1)."""
    torch.manual_seed(0)
    model = randomize_(create_model("dovit-s", num_classes=150, img_size=128), seed=5, aux_scale=AUX_SCALE).eval()
    table = model.backbone.pos_embed.detach()
    with torch.inference_mode():
        assert torch.equal(model.backbone.position_embedding(4, 16), table)
        assert torch.equal(model.backbone.position_embedding(8, 8), table)
        resized = model.backbone.position_embedding(4, 15)
    grid = table[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    bicubic = torch.nn.functional.interpolate(grid, size=(4, 15), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized[:, 1:], bicubic.flatten(2).transpose(1, 2), rtol=0, atol=0)
    images = structured_images(1, 64, 256)  # 4x16 tokens
    with torch.inference_mode():
        ours, stats = model.forward_with_stats(images)
    expected, kept = reference_forward(model.state_dict(), images, 0.96)
    assert torch.equal(_kept_counts(stats, 64, 256), kept)
    assert _relative(ours, expected)[0] <= MAX_BOUND


@pytest.mark.parametrize("name", [n for n in list_models(family="dovit") if n != "dovit-s"])
def test_larger_variants_match_reference_at_a_tiny_size(name):
    torch.manual_seed(0)
    model = randomize_(create_model(name, num_classes=150), seed=6, aux_scale=AUX_SCALE).eval()
    images = structured_images(1, 64, 80, seed=1)
    with torch.inference_mode():
        ours, stats = model.forward_with_stats(images)
    expected, kept = reference_forward(model.state_dict(), images, 0.96)
    assert torch.equal(_kept_counts(stats, 64, 80), kept)
    max_rel, mean_rel = _relative(ours, expected)
    assert max_rel <= MAX_BOUND and mean_rel <= MEAN_BOUND, (max_rel, mean_rel)


def test_concurrent_thresholds_are_thread_safe(model_s):
    """Several thresholds from several threads at once on one model give their single-threaded results."""
    settings = [0.96, 0.9, math.inf, (0.96, 0.93, 0.9)]
    images = structured_images(1, 64, 96, seed=7)
    with torch.inference_mode():
        single = [model_s.forward_with_stats(images, exit_threshold=t) for t in settings]
    assert _relative(single[0][0], single[2][0])[0] > 1e-2  # the settings really differ
    barrier = threading.Barrier(4)

    def task(i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        which = i % len(settings)
        if i < 4:
            barrier.wait(timeout=30)
        with torch.inference_mode():
            logits, stats = model_s.forward_with_stats(images, exit_threshold=settings[which])
        return which, logits, stats["kept_fraction"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(task, range(8)))
    for which, logits, kept in results:
        assert torch.equal(kept, single[which][1]["kept_fraction"])
        assert _relative(logits, single[which][0])[0] <= 1e-6
