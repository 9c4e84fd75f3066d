"""Unit tests for models/postprocess.py: the fast labels_from_logits against the dense reference.

The fast path sums in another order than F.interpolate, so the masks may differ where the reference's top
two logits are within float32 rounding of each other. Each comparison therefore recomputes the reference's
full-resolution logits, marks the pixels whose top-1 / top-2 gap is below 1e-4 as near-ties, requires every
other pixel to match exactly, and requires the near-ties to be a tiny fraction of the image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import postprocess
from models.bench_postprocess import noise_logits, smooth_logits
from models.postprocess import interpolation_matrix, labels_from_logits, reference_labels, resize_logits

NEAR_TIE = 1e-4
Shape = tuple[int, int, int, int]


def reference_full(logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
    return resize_logits(resize_logits(logits, input_size), original_size)


def assert_matches_reference(
    logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], labels: np.ndarray
) -> None:
    full = reference_full(logits, input_size, original_size)
    expected = full.argmax(dim=1).numpy()
    num_classes = logits.shape[1]
    assert labels.dtype == (np.uint8 if num_classes <= 256 else np.int32)
    assert labels.shape == (logits.shape[0], *original_size)
    if num_classes >= 2:
        top2 = full.topk(2, dim=1).values
        near_tie = ((top2[:, 0] - top2[:, 1]) < NEAR_TIE).numpy()
    else:
        near_tie = np.zeros(expected.shape, dtype=bool)
    wrong = (labels != expected) & ~near_tie
    assert not wrong.any(), f"{int(wrong.sum())} pixels differ outside near-ties, first at {np.argwhere(wrong)[0]}"
    assert near_tie.mean() < 2e-3, f"near-ties {near_tie.mean():.2e}: too many to call rounding"


def make(kind: str, shape: Shape, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if kind == "smooth":
        return smooth_logits(rng, shape)
    if kind == "busy":  # many small regions, weak margins: many boundary pixels, third classes at boundaries
        return smooth_logits(rng, shape, regions=60, margin=4.0)
    return noise_logits(rng, shape)


@pytest.fixture
def fast_path_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """No fallback to the dense reference, whatever the logits; counts the pixels each refinement step saw."""
    monkeypatch.setattr(postprocess, "_MAX_MIXED_FRACTION", 2.0)
    monkeypatch.setattr(postprocess, "_MAX_FULL_FRACTION", 2.0)

    def refuse(*args: object) -> np.ndarray:
        raise AssertionError("fell back to the reference")

    monkeypatch.setattr(postprocess, "reference_labels", refuse)
    seen = {"top3": 0, "full": 0}

    def count(name: str, fn: Callable[..., tuple[np.ndarray, np.ndarray] | np.ndarray]) -> Callable[..., object]:
        def wrapped(vectors: np.ndarray, support: np.ndarray, *rest: np.ndarray) -> object:
            seen[name] += len(support)
            return fn(vectors, support, *rest)

        return wrapped

    monkeypatch.setattr(postprocess, "_argmax_with_bound", count("top3", postprocess._argmax_with_bound))
    monkeypatch.setattr(postprocess, "_full_argmax", count("full", postprocess._full_argmax))
    yield seen


# ----------------------------------------------------------------------------------------------------------
# Interpolation matrices

AXES = [
    (64, 512, 512),  # stride 8 up, second resize the identity
    (88, 704, 683),  # up, then slightly down
    (64, 512, 300),  # up, then down by 1.7
    (128, 1024, 1000),
    (256, 2048, 1900),
    (1024, 1024, 1000),  # slide mode: logits already at the input size
    (7, 7, 7),
    (1, 8, 5),
    (5, 40, 1),
    (9, 3, 4),  # a first resize that shrinks
    (3, 17, 16),
]


@pytest.mark.parametrize("n_low,n_mid,n_out", AXES)
def test_interpolation_matrix_is_convex_and_matches_torch(n_low: int, n_mid: int, n_out: int) -> None:
    matrix = interpolation_matrix(n_low, n_mid, n_out)
    assert matrix.shape == (n_out, n_low)
    assert (matrix >= 0).all()
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    # Applied along both axes to random data, the matrices reproduce the two-stage F.interpolate.
    rng = np.random.default_rng(n_low * 1000 + n_out)
    data = torch.from_numpy(rng.standard_normal((1, 3, n_low, 11)).astype(np.float32))
    expected = resize_logits(resize_logits(data, (n_mid, 23)), (n_out, 19))[0].double().numpy()
    across = interpolation_matrix(11, 23, 19)
    got = np.einsum("yi,kij,xj->kyx", matrix, data[0].double().numpy(), across)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("n_in,n_out", [(64, 512), (512, 683), (704, 683), (512, 300), (1024, 1000), (5, 1), (1, 6)])
def test_one_resize_matches_torch_weights(n_in: int, n_out: int) -> None:
    """A one-hot basis through F.interpolate exposes torch's own 1-D weights."""
    basis = torch.eye(n_in, dtype=torch.float32).reshape(1, n_in, n_in, 1)
    torch_matrix = F.interpolate(basis, size=(n_out, 1), mode="bilinear", align_corners=False)[0, :, :, 0].T
    np.testing.assert_allclose(interpolation_matrix(n_in, n_out, n_out), torch_matrix.double().numpy(), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Labels against the reference

CASES: list[tuple[Shape, tuple[int, int], tuple[int, int]]] = [
    ((1, 150, 64, 64), (512, 512), (512, 512)),  # identity second step
    ((1, 150, 64, 88), (512, 704), (512, 683)),
    ((1, 150, 64, 96), (512, 768), (300, 450)),  # original smaller than the input: a shrinking second step
    ((1, 150, 40, 30), (320, 240), (600, 450)),  # original larger than the input
    ((1, 300, 16, 24), (128, 192), (100, 150)),  # K > 256: int32 labels
    ((1, 19, 128, 160), (128, 160), (100, 130)),  # slide mode: first step the identity
    ((2, 19, 32, 48), (256, 384), (250, 370)),  # batch
]


@pytest.mark.parametrize("kind", ["smooth", "busy", "noise"])
@pytest.mark.parametrize("shape,input_size,original_size", CASES)
def test_fast_path_matches_reference(
    fast_path_only: dict[str, int], kind: str, shape: Shape, input_size: tuple[int, int], original_size: tuple[int, int]
) -> None:
    logits = make(kind, shape)
    labels = labels_from_logits(logits, input_size, original_size)
    assert_matches_reference(logits, input_size, original_size, labels)


def test_every_refinement_step_is_exercised(fast_path_only: dict[str, int]) -> None:
    """Pure noise defeats the 2-class bound and the top-3 bound often: all three steps run, still exact."""
    logits = make("noise", (1, 150, 64, 88))
    labels = labels_from_logits(logits, (512, 704), (512, 683))
    assert_matches_reference(logits, (512, 704), (512, 683), labels)
    assert fast_path_only["top3"] > 0 and fast_path_only["full"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["smooth", "busy"])
def test_cityscapes_sized(fast_path_only: dict[str, int], kind: str) -> None:
    logits = make(kind, (2, 19, 128, 256))
    labels = labels_from_logits(logits, (1024, 2048), (1000, 1900))
    assert_matches_reference(logits, (1024, 2048), (1000, 1900), labels)


TINY: list[tuple[Shape, tuple[int, int], tuple[int, int]]] = [
    ((1, 3, 1, 1), (8, 8), (5, 7)),
    ((1, 5, 1, 7), (8, 56), (3, 40)),
    ((1, 4, 9, 1), (72, 8), (60, 3)),
    ((1, 6, 2, 2), (16, 16), (1, 1)),
    ((1, 2, 8, 8), (64, 64), (50, 70)),  # K = 2: no third class
    ((1, 1, 8, 8), (64, 64), (50, 50)),  # K = 1
    ((1, 150, 33, 47), (33, 47), (33, 47)),  # nothing to resize
]


@pytest.mark.parametrize("kind", ["smooth", "noise"])
@pytest.mark.parametrize("shape,input_size,original_size", TINY)
def test_tiny_and_degenerate_shapes(
    fast_path_only: dict[str, int], kind: str, shape: Shape, input_size: tuple[int, int], original_size: tuple[int, int]
) -> None:
    logits = make(kind, shape) if min(shape[2:]) >= 2 and kind == "smooth" else make("noise", shape)
    labels = labels_from_logits(logits, input_size, original_size)
    assert_matches_reference(logits, input_size, original_size, labels)


def test_exact_ties_break_to_the_first_class(fast_path_only: dict[str, int]) -> None:
    """Integer-valued logits with many exact ties everywhere (also after interpolation): torch's first index."""
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.integers(0, 3, (1, 6, 8, 8)).astype(np.float32))
    labels = labels_from_logits(logits, (64, 64), (64, 64))
    expected = reference_full(logits, (64, 64), (64, 64)).argmax(dim=1).numpy()
    # Dyadic weights (multiples of 1/16) on small integers are exact in float32, so no rounding at all here.
    np.testing.assert_array_equal(labels, expected)


# ----------------------------------------------------------------------------------------------------------
# When the fast path hands over to the reference


def count_reference_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"n": 0}

    def counted(*args: object) -> np.ndarray:
        calls["n"] += 1
        return reference_labels(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(postprocess, "reference_labels", counted)
    return calls


def test_smooth_logits_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_reference_calls(monkeypatch)
    logits = make("smooth", (1, 150, 64, 88))
    labels = labels_from_logits(logits, (512, 704), (512, 683))
    assert calls["n"] == 0
    assert_matches_reference(logits, (512, 704), (512, 683), labels)


def test_noise_falls_back_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise-like logits (nearly every pixel on a boundary) use the dense reference: never much slower."""
    calls = count_reference_calls(monkeypatch)
    logits = torch.cat([make("noise", (1, 150, 64, 88)), make("smooth", (1, 150, 64, 88))])
    labels = labels_from_logits(logits, (512, 704), (512, 683))
    assert calls["n"] == 1  # the noisy image only
    assert_matches_reference(logits, (512, 704), (512, 683), labels)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_use_the_reference(bad: float) -> None:
    logits = make("smooth", (1, 19, 16, 16))
    logits[0, 3, 5, 7] = bad
    np.testing.assert_array_equal(
        labels_from_logits(logits, (128, 128), (100, 90)), reference_labels(logits, (128, 128), (100, 90))
    )


def test_other_dtypes_use_the_reference() -> None:
    logits = make("smooth", (1, 19, 16, 16)).double()
    np.testing.assert_array_equal(
        labels_from_logits(logits, (128, 128), (100, 90)), reference_labels(logits, (128, 128), (100, 90))
    )


def test_requires_grad_and_non_contiguous_inputs() -> None:
    base = make("smooth", (1, 19, 16, 24))
    logits = base.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)  # same values, strided
    assert not logits.is_contiguous()
    labels = labels_from_logits(logits, (128, 192), (100, 150))
    assert_matches_reference(base, (128, 192), (100, 150), labels)


def test_resize_logits_unchanged() -> None:
    logits = make("noise", (1, 4, 8, 8))
    assert resize_logits(logits, (8, 8)) is logits
    torch.testing.assert_close(
        resize_logits(logits, (64, 48)), F.interpolate(logits, size=(64, 48), mode="bilinear", align_corners=False)
    )


@pytest.mark.parametrize(("num_classes", "low", "mid", "out"), [(150, (16, 20), (128, 160), (100, 130)),
                                                                 (3, (5, 7), (40, 56), (41, 57))])
def test_the_reference_runs_in_class_chunks_with_the_same_result(monkeypatch, num_classes, low, mid, out) -> None:
    """The reference never holds K full-size maps (21.6 GB for 150 classes at 6000x6000), yet its argmax is the
    one-shot argmax exactly, first index on ties included."""
    import models.postprocess as postprocess

    logits = torch.randn(2, num_classes, *low, generator=torch.Generator().manual_seed(num_classes))
    logits[:, -1] = logits[:, 0]  # exact ties between the first and the last class: the first must win
    one_shot = resize_logits(resize_logits(logits, mid), out).argmax(dim=1).numpy()
    monkeypatch.setattr(postprocess, "REFERENCE_CHUNK_BYTES", 1)  # one class at a time
    np.testing.assert_array_equal(postprocess.reference_labels(logits, mid, out), one_shot)
