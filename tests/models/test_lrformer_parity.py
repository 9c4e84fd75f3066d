"""LRFormer parity with an independent, spec-literal reference (tests/models/reference_lrformer.py), the exportable
pooling against `F.adaptive_avg_pool2d`, and thread safety of the pooled-size knob.

fp32 noise: the two implementations lay tensors out differently (NCHW vs tokens), so CPU kernels round
differently. Each of them, against the float64 reference, is off by max ~5e-6 and mean ~1e-6 of the logits' std
(measured); so in fp32 the bounds are max 1e-5 and mean 2e-6 x std, and the float64 runs (agreeing to ~1e-14)
are what proves the arithmetic identical (an eps of 1e-6 instead of 1e-5 shows there as ~1e-6).
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.layers import lrformer_pooling
from models.layers.lrformer_pooling import (
    aspect_pooled_size,
    matrix_adaptive_avg_pool2d,
    pooled_sizes,
    pyramid_sizes,
    query_and_pyramid_sizes,
)
from tests.models.reference_lrformer import pooled_size as reference_pooled_size
from tests.models.reference_lrformer import randomize_, reference_forward

LEVELS = (16, 12, 8)
# (batch, height, width): square in a batch of 2, landscape, portrait, and sides that are not multiples of 32
# (93 mod 32 = 29, 126 mod 32 = 30) but that the official backbone takes. Every level runs the first and the
# last; the training level runs all. (The LRHead's query grid is 32 on the short side whatever the input, so
# even tiny inputs cost ~1 GMAC: the sizes stay few and near-square.)
SIZES = [(2, 64, 64), (1, 64, 96), (1, 128, 96), (1, 93, 126)]
CASES = [(16, size) for size in SIZES] + [(level, size) for level in LEVELS[1:] for size in (SIZES[0], SIZES[-1])]


def _images(batch: int, height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(height * 1000 + width)
    return torch.randn(batch, 3, height, width, generator=generator).to(dtype)


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max, mean) |actual - expected| over the std of the expected logits."""
    scale = float(expected.std())
    diff = (actual.double() - expected.double()).abs()
    return float(diff.max()) / scale, float(diff.mean()) / scale


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(create_model("lrformer-t", num_classes=19), seed=1).eval()


class Runs:
    """Logits of the model and of the reference per (pooled size, size), computed once per module."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ours: dict[tuple[int, tuple[int, int, int]], torch.Tensor] = {}
        self.reference: dict[tuple[int, tuple[int, int, int]], torch.Tensor] = {}

    def run(self, pooled_size: int, size: tuple[int, int, int]) -> torch.Tensor:
        if (pooled_size, size) not in self.ours:
            images = _images(*size)
            with torch.inference_mode():  # no keyword at 16: the default is the training setting
                logits = self.model(images, pooled_size=pooled_size) if pooled_size != 16 else self.model(images)
            self.ours[(pooled_size, size)] = logits
        return self.ours[(pooled_size, size)]

    def expected(self, pooled_size: int, size: tuple[int, int, int]) -> torch.Tensor:
        if (pooled_size, size) not in self.reference:
            self.reference[(pooled_size, size)] = reference_forward(
                self.model.state_dict(), _images(*size), pooled_size
            )
        return self.reference[(pooled_size, size)]


@pytest.fixture(scope="module")
def runs(model) -> Runs:
    return Runs(model)


def test_random_weights_are_non_trivial_and_keep_spatial_structure(model, runs):
    state = model.state_dict()
    assert float(state["backbone.block3.0.layer_scale_1"].min()) > 0.2  # the LRSA branches matter
    assert not torch.allclose(state["decode_head.fuse_block1.norm1.running_var"], torch.ones(256))
    assert not torch.allclose(state["backbone.block1.0.attn.norm.bias"], torch.zeros(48))
    assert runs.run(16, (1, 128, 96)).argmax(1).unique().numel() >= 5  # several classes: the maps are not flat


@pytest.mark.parametrize(("pooled_size", "size"), CASES, ids=[f"s{s}-{b}x{h}x{w}" for s, (b, h, w) in CASES])
def test_matches_the_reference(runs, pooled_size, size):
    ours, expected = runs.run(pooled_size, size), runs.expected(pooled_size, size)
    assert ours.shape == expected.shape == (size[0], 19, -(-size[1] // 8), -(-size[2] // 8))
    max_diff, mean_diff = _relative(ours, expected)
    assert max_diff <= 1e-5 and mean_diff <= 2e-6, (max_diff, mean_diff)


@pytest.mark.parametrize(("pooled_size", "size"), [(8, (1, 61, 64))])
def test_matches_the_reference_in_float64(model, pooled_size, size):
    model64 = copy.deepcopy(model).double()
    images = _images(*size, dtype=torch.float64)
    with torch.inference_mode():
        ours = model64(images, pooled_size=pooled_size)
    expected = reference_forward(model64.state_dict(), images, pooled_size)
    max_diff, _ = _relative(ours, expected)
    assert max_diff < 1e-12


def test_levels_differ_far_beyond_the_tolerance(runs):
    """Guards the parity tests' power: a model that ignored the knob would be caught."""
    outputs = [runs.run(level, SIZES[-1]) for level in LEVELS]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert _relative(outputs[i], outputs[j])[0] > 1e-3


def test_images_in_a_batch_do_not_affect_each_other(model, runs):
    batched = runs.run(16, SIZES[0])
    images = _images(*SIZES[0])
    assert _relative(batched[0], batched[1])[0] > 0.1  # two different images
    for i in range(2):
        with torch.inference_mode():
            single = model(images[i : i + 1])
        assert _relative(single, batched[i : i + 1])[0] < 2e-5  # fp32 noise: kernels pick layouts by batch


@pytest.mark.parametrize("pooled_size", [16, 8])
def test_exported_pooling_path_matches_the_reference(model, runs, monkeypatch, pooled_size):
    """The matrix pooling that exported graphs run, forced in eager mode, through the whole model."""
    monkeypatch.setattr(lrformer_pooling, "is_exporting", lambda: True)
    with torch.inference_mode():
        ours = model(_images(*SIZES[-1]), pooled_size=pooled_size)
    max_diff, mean_diff = _relative(ours, runs.expected(pooled_size, SIZES[-1]))
    assert max_diff <= 1e-5 and mean_diff <= 2e-6, (max_diff, mean_diff)


def test_concurrent_pooled_sizes_are_thread_safe(model, runs):
    single = {level: runs.run(level, SIZES[0]) for level in (16, 8)}
    images = _images(*SIZES[0])
    barrier = threading.Barrier(4)

    def task(i: int) -> tuple[int, torch.Tensor]:
        level = (16, 8)[i % 2]
        barrier.wait(timeout=120)  # all four start together
        with torch.inference_mode():
            return level, model(images, pooled_size=level)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(task, range(4)))
    for level, logits in results:
        assert _relative(logits, single[level])[0] < 1e-6, level  # another level would differ by > 1e-3


# --- the pooling primitives ----------------------------------------------------------------------------------


def test_pooled_sizes_equal_the_official_rounding():
    """Integer arithmetic == round(long * s / short + 0.001) with Python floats, for every short side < 500."""
    sizes = sorted({*LEVELS, 32, *(p for s in (*LEVELS, 32) for p in pyramid_sizes(s))})
    for size in sizes:
        for height in range(1, 500, 11):
            for width in range(1, 1000, 3):
                assert aspect_pooled_size(height, width, size) == reference_pooled_size(height, width, size)


def test_pyramid_sizes():
    assert pyramid_sizes(16) == (11, 8, 6, 4)
    assert pyramid_sizes(12) == (8, 6, 5, 3)
    assert pyramid_sizes(8) == (6, 4, 3, 2)
    assert pyramid_sizes(32) == (22, 16, 12, 8)


def test_in_graph_sizes_equal_the_eager_ones():
    """The tensor forms that exported graphs compute (the pooled size as a graph input)."""
    for size in range(2, 65):
        targets = query_and_pyramid_sizes(torch.tensor(float(size)))
        assert tuple(targets.tolist()) == (size, *pyramid_sizes(size))
        for height, width in [(16, 16), (16, 24), (30, 8), (127, 64), (8, 9)]:
            assert pooled_sizes(height, width, targets).sizes == pooled_sizes(height, width, targets.tolist()).sizes


@pytest.mark.parametrize("size", [16, 11, 6, 2, 32])
def test_matrix_pooling_equals_adaptive_avg_pool2d(size):
    generator = torch.Generator().manual_seed(size)
    for height, width in [(16, 24), (37, 53), (8, 12), (4, 6), (1, 3), (96, 40), (2, 2), (128, 256)]:
        x = torch.randn(2, 5, height, width, generator=generator) * 3 + 1
        out_height, out_width = aspect_pooled_size(height, width, size)
        expected = F.adaptive_avg_pool2d(x, (out_height, out_width))
        got = matrix_adaptive_avg_pool2d(x, out_height, out_width)
        assert got.shape == expected.shape
        # window sums in another order: float rounding of the inputs' magnitude
        assert float((got - expected).abs().max()) <= 1e-6 * float(x.abs().max()), (height, width)
