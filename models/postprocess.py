"""From stride-8 logits to a label map at the original image size.

The reference (mmseg) resizes logits bilinearly (align_corners=False) to the network input size, then
again to the original size, then takes the argmax. A resize to the same size is the identity and is
skipped. `reference_labels` does exactly that; on a CPU with K=150 classes it is slow, because it
materialises K full-resolution planes (twice) only to keep one index per pixel.

`labels_from_logits` gives the same mask while interpolating only a few numbers, and only near class
boundaries. Why it is exact:

* The two resizes (bilinear, align_corners=False, no antialias: 2 taps per axis even when shrinking)
  compose into separable 1-D matrices Ay (H, h) and Ax (W, w) with non-negative rows summing to 1:
  full[:, y, x] = sum_ij Ay[y, i] Ax[x, j] low[:, i, j]. Each output vector is therefore a *convex
  combination* of the few low-res vectors in its support (a small window of the low-res grid).
* Uniform supports (most of the image). If every vector of the support has argmax c (torch's rule: the
  first index of the max), then v[c] > v[k] for k < c and v[c] >= v[k] for k > c in each of them, and a
  combination with non-negative weights summing to 1 keeps both, so its argmax is c as well. Those pixels
  take c from the low-res argmax, whose min == max over the support.
* Mixed supports (class boundaries). Let C be the distinct argmax classes of the support. A class k
  outside C is below the 2nd largest value r_i of every support vector v_i (below the 3rd when v_i's 2nd
  class is in C), so full[k] <= sum_i w_i r_i. Each pixel interpolates only the classes of C (usually 2)
  and that bound; when the best of C beats the bound, nothing outside C can win and the argmax over C
  (ascending, first index) is the reference's.
* The few pixels where the bound fails are redone with the top-3 classes of every support vector against
  the 4th largest values, and the rest (rarer still) with all K classes. When the logits are so noisy
  that much of the image would need that, the dense reference is cheaper and is used instead.

Floating point: the reference rounds in float32 and sums in another order, so the masks can differ only
where the reference's top two logits are within rounding error (~1e-6) of each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

# Use the reference when more than this fraction of the output pixels have a mixed support (noise-like
# logits), or when more than the second fraction would need all K classes: the dense resize is then cheaper.
_MAX_MIXED_FRACTION = 0.6
_MAX_FULL_FRACTION = 0.05
# Windows with more argmax classes than this share one group, padded to the largest.
_MAX_GROUPED_CANDIDATES = 4
# Bulk steps are done in chunks of about this many float32 elements (bounds the temporary memory).
_CHUNK_ELEMENTS = 1 << 22
# Supports with more low-res vectors than this (only when a resize shrinks a lot) go to the reference.
_MAX_TAPS = 16


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=False; the identity when the size already matches."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _label_dtype(num_classes: int) -> type[np.integer]:
    return np.uint8 if num_classes <= 256 else np.int32


# The reference resizes all K classes to the image's size at once: K x H x W floats (21.6 GB for 150 classes at
# 6000x6000). It runs a few classes at a time instead, so that its temporary memory stays about this size plus
# ~6 bytes a pixel (the running maximum, the labels and a mask).
REFERENCE_CHUNK_BYTES = 16 << 20


def reference_labels(logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """The reference: two dense bilinear resizes, then the argmax over classes.

    Computed a chunk of classes at a time with a running maximum: every class is resized independently, and a
    later class wins only when strictly greater, so the result is exactly the one-shot argmax (first on ties).
    """
    batch, num_classes = logits.shape[:2]
    per_class = 4 * batch * (input_size[0] * input_size[1] + original_size[0] * original_size[1])
    step = max(1, REFERENCE_CHUNK_BYTES // per_class)
    if step >= num_classes:
        full = resize_logits(resize_logits(logits, input_size), original_size)
        return full.argmax(dim=1).numpy().astype(_label_dtype(num_classes))
    dtype = torch.uint8 if num_classes <= 256 else torch.int32
    best = torch.full((batch, *original_size), -torch.inf)
    labels = torch.zeros((batch, *original_size), dtype=dtype)
    better = torch.empty((batch, *original_size), dtype=torch.bool)
    for start in range(0, num_classes, step):
        part = resize_logits(resize_logits(logits[:, start : start + step], input_size), original_size)
        for offset in range(part.shape[1]):
            torch.gt(part[:, offset], best, out=better)  # strictly greater: an earlier class keeps a tie
            labels.masked_fill_(better, start + offset)
            torch.maximum(best, part[:, offset], out=best)
        del part
    return labels.numpy().astype(_label_dtype(num_classes), copy=False)


# ----------------------------------------------------------------------------------------------------------
# 1-D interpolation matrices


def _resize_step(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's bilinear resize along one axis (align_corners=False): per output position, 2 taps.

    Returns (index (n_out, 2) int64, weight (n_out, 2) float64). Mirrors ATen's float32 arithmetic
    (compute_source_index_and_lambda): scale = float(in) / out, src = scale * (dst + 0.5) - 0.5 (contracted
    to one fused multiply-add by the compiler in the AVX2 / AVX512 kernels, so emulated here exactly in
    float64 and rounded once), clamped at 0; i0 = min(floor(src), in - 1), i1 = min(i0 + 1, in - 1),
    lambda = clamp(src - i0, 0, 1), weights (1 - lambda, lambda) in float32. Shrinking uses the same 2 taps
    (no antialias). The identity when the sizes match (the reference skips that resize).
    """
    if n_in == n_out:
        index = np.arange(n_out, dtype=np.int64)[:, None].repeat(2, axis=1)
        return index, np.tile(np.array([1.0, 0.0]), (n_out, 1))
    dst = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    i1 = i0 + (i0 < n_in - 1)
    weight = np.stack([np.float32(1.0) - lam, lam], axis=1).astype(np.float64)
    return np.stack([i0, i1], axis=1), weight


def _compose(n_low: int, n_mid: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize n_low -> n_mid then n_mid -> n_out, as (index, weight), each (n_out, 4)."""
    index1, weight1 = _resize_step(n_low, n_mid)
    index2, weight2 = _resize_step(n_mid, n_out)
    index = index1[index2].reshape(n_out, 4)
    weight = (weight2[:, :, None] * weight1[index2]).reshape(n_out, 4)
    return index, weight


def interpolation_matrix(n_low: int, n_mid: int, n_out: int) -> np.ndarray:
    """Dense (n_out, n_low) float64 matrix of resize n_low -> n_mid -> n_out (for tests and checks)."""
    index, weight = _compose(n_low, n_mid, n_out)
    matrix = np.zeros((n_out, n_low))
    np.add.at(matrix, (np.arange(n_out)[:, None].repeat(4, axis=1), index), weight)
    return matrix


@dataclass(frozen=True)
class _Axis:
    """One axis of the separable interpolation, compactly (arrays read-only: the result is cached).

    Output position p reads `taps` consecutive low-res positions from the first of its support, with
    weights that are zero past the support's last. Consecutive positions with the same support form a
    *window* (supports never move backwards, so a window is a run; long runs are split). Per window u: its
    support `window_taps[u]` (clamped to the last position: repeats change no min / max and get weight
    zero), and its `window_size[u]` positions `window_pos[:, u]` with their weights, padded to the largest
    window by repeating the last position (which then just computes the same pixel twice).
    """

    taps: int
    window: np.ndarray  # (n_out,) int64: window of each output position
    window_taps: np.ndarray  # (U, taps) int64
    window_size: np.ndarray  # (U,) int64
    window_pos: np.ndarray  # (S, U) int64, S = largest window (window last: vectorised over windows)
    window_weights: np.ndarray  # (S, taps, U) float32


@lru_cache(maxsize=64)
def _axis(n_low: int, n_mid: int, n_out: int) -> _Axis:
    index, weight = _compose(n_low, n_mid, n_out)
    used = weight > 0  # the support: taps with a zero weight (lambda == 0, identity) do not count
    lo = np.where(used, index, n_low).min(axis=1)
    hi = np.where(used, index, -1).max(axis=1)
    taps = int((hi - lo).max()) + 1
    weights = np.zeros((n_out, taps))
    rows = np.arange(n_out)[:, None].repeat(4, axis=1)
    np.add.at(weights, (rows, np.where(used, index - lo[:, None], 0)), np.where(used, weight, 0.0))
    runs = np.flatnonzero(np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])])
    run_sizes = np.diff(np.r_[runs, n_out])
    # Split runs into windows of at most `cap` positions. Blocks of pixels are padded to the largest window
    # (a few long runs beside many short ones waste work) and each window has a cost of its own (gathering
    # its support): minimise windows x (1 + cap), a rough model of both.
    caps = np.arange(1, run_sizes.max() + 1)
    pieces = -(-run_sizes[None, :] // caps[:, None])  # (caps, runs): windows per run
    cap = int(caps[np.argmin(pieces.sum(axis=1) * (1 + caps))])
    starts = runs[:, None] + cap * np.arange(pieces[cap - 1].max())[None, :]
    starts = starts[starts < np.r_[runs[1:], n_out][:, None]]
    sizes = np.diff(np.r_[starts, n_out])
    change = np.zeros(n_out, dtype=bool)
    change[starts[1:]] = True
    window_pos = starts[:, None] + np.minimum(np.arange(sizes.max()), sizes[:, None] - 1)
    arrays = {
        "window": np.cumsum(change),
        "window_taps": np.minimum(lo[starts, None] + np.arange(taps), hi[starts, None]),
        "window_size": sizes,
        "window_pos": np.ascontiguousarray(window_pos.T),
        "window_weights": np.ascontiguousarray(weights[window_pos].astype(np.float32).transpose(1, 2, 0)),
    }
    for array in arrays.values():
        array.flags.writeable = False
    return _Axis(taps=taps, **arrays)


# ----------------------------------------------------------------------------------------------------------
# The fast path. numpy throughout: single-threaded and predictable, where torch's parallel regions stall
# behind other processes on a shared 2-core box.


def _max_and_argmax(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, n) -> the max over axis 0 and its first index (torch's tie rule).

    Faster than numpy's argmax over the outer axis: a vectorised max, then the matching rows from the last
    to the first, so that the first index is written last.
    """
    best = values.max(axis=0)
    index = np.zeros(values.shape[1], dtype=np.int64)
    for k in range(values.shape[0] - 1, 0, -1):
        index[values[k] == best] = k
    index[values[0] == best] = 0
    return best, index


def _interpolate_windows(channels: np.ndarray, wy: np.ndarray, wx: np.ndarray, ay: _Axis, ax: _Axis) -> np.ndarray:
    """Separable interpolation of per-window channels over each window's (padded) block of pixels.

    channels: (D, ty, tx, M), D channels over the support of windows (wy, wx); returns (D, Sy, Sx, M).
    Windows are the last, contiguous axis so that numpy's loops run over them.
    """
    rows, cols = ay.window_weights[:, :, wy], ax.window_weights[:, :, wx]  # (Sy, ty, M), (Sx, tx, M)
    across = channels[:, :, 0, None, :] * cols[:, 0]  # (D, ty, Sx, M)
    for dx in range(1, ax.taps):
        across += channels[:, :, dx, None, :] * cols[:, dx]
    out = across[:, None, 0] * rows[:, 0, None, :]  # (D, Sy, Sx, M)
    for dy in range(1, ay.taps):
        out += across[:, None, dy] * rows[:, dy, None, :]
    return out


def _argmax_with_bound(
    vectors: np.ndarray, support: np.ndarray, weight: np.ndarray, classes: np.ndarray, bound: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel n: the best of `classes[n]` (ascending; first on ties) and whether it beats the bound.

    vectors (K, P) low-res vectors; support (n, taps) into them, with weight (n, taps); bound (P,) per vector.
    """
    best = np.empty(len(support), dtype=np.int64)
    certain = np.empty(len(support), dtype=bool)
    chunk = max(1, _CHUNK_ELEMENTS // (support.shape[1] * classes.shape[1]))
    for start in range(0, len(support), chunk):
        part = slice(start, start + chunk)
        sup, wgt, cls = support[part], weight[part], classes[part]
        values = vectors.reshape(-1).take(cls[:, None, :] * vectors.shape[1] + sup[:, :, None])  # (n, taps, C)
        scores = np.einsum("nt,ntc->nc", wgt, values)
        pick = scores.argmax(axis=1)
        best[part] = np.take_along_axis(cls, pick[:, None], axis=1)[:, 0]
        top = np.take_along_axis(scores, pick[:, None], axis=1)[:, 0]
        certain[part] = top > np.einsum("nt,nt->n", wgt, bound[sup])
    return best, certain


def _full_argmax(vectors: np.ndarray, support: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per pixel n: argmax over all K classes of sum_t weight[n, t] * vectors[:, support[n, t]]."""
    rows = np.ascontiguousarray(vectors.T)  # (P, K)
    out = np.empty(len(support), dtype=np.int64)
    chunk = max(1, _CHUNK_ELEMENTS // (support.shape[1] * rows.shape[1]))
    for start in range(0, len(support), chunk):
        part = slice(start, start + chunk)
        out[part] = np.matmul(weight[part, None, :], rows.take(support[part], axis=0))[:, 0].argmax(axis=1)
    return out


def _fast_labels(flat: np.ndarray, h: int, w: int, ay: _Axis, ax: _Axis, out: np.ndarray) -> bool:
    """(K, h * w) float32 logits -> labels written into `out` (H, W); False when the reference should be used."""
    num_classes = flat.shape[0]
    height, width = out.shape
    labels = out.reshape(-1)

    # (1) Low-res argmax, and its min / max over every window's support (rows, then columns).
    top, first = _max_and_argmax(flat)
    lowest = float(flat.min())
    if not (np.isfinite(top).all() and np.isfinite(lowest)):
        return False  # NaN / inf: torch's NaN propagation (0 * inf in zero-weight taps) is not mirrored
    grid = first.astype(np.int16 if num_classes <= 1 << 15 else np.int32).reshape(h, w)
    row_min = grid.take(ay.window_taps[:, -1], axis=0)  # (Uy, w); the last tap is the support's last row
    row_max = row_min.copy()
    for d in range(ay.taps - 1):
        rows = grid.take(ay.window_taps[:, d], axis=0)
        np.minimum(row_min, rows, out=row_min)
        np.maximum(row_max, rows, out=row_max)
    win_min, win_max = row_min.take(ax.window_taps[:, -1], axis=1), row_max.take(ax.window_taps[:, -1], axis=1)
    for d in range(ax.taps - 1):  # (Uy, Ux)
        np.minimum(win_min, row_min.take(ax.window_taps[:, d], axis=1), out=win_min)
        np.maximum(win_max, row_max.take(ax.window_taps[:, d], axis=1), out=win_max)
    wy, wx = np.nonzero(win_min != win_max)
    mixed = len(wy)
    if (ay.window_size[wy] * ax.window_size[wx]).sum() > _MAX_MIXED_FRACTION * height * width:
        return False
    # Uniform windows are done (mixed ones are all overwritten below).
    out[:] = np.repeat(win_min.astype(out.dtype).take(ax.window, axis=1), ay.window_size, axis=0)
    if mixed == 0:
        return True

    # (2) Mixed windows: supports as indices into the P low-res vectors they touch; argmax classes C of each
    # support (ascending, `counts` distinct, then `num_classes` as filler); the bound per touched vector.
    taps = ay.taps * ax.taps
    support = (ay.window_taps[wy, :, None] * w + ax.window_taps[wx, None, :]).reshape(mixed, taps)
    is_touched = np.zeros(h * w, dtype=bool)
    is_touched[support] = True
    touched = np.flatnonzero(is_touched)
    inverse = (np.cumsum(is_touched) - 1)[support]  # (M, taps) into `touched`
    vectors = np.take(flat, touched, axis=1)  # (K, P)
    first = first[touched]
    classes = np.sort(first[inverse], axis=1)
    repeat = np.zeros(classes.shape, dtype=bool)
    repeat[:, 1:] = classes[:, 1:] == classes[:, :-1]
    classes[repeat] = num_classes  # sorts last
    classes.sort(axis=1)
    counts = taps - repeat.sum(axis=1)
    columns = np.arange(len(touched))
    masked = vectors.copy()  # ranks 2, 3, 4 of each vector by masking out the ones above
    masked[first, columns] = -np.inf
    second_value, second = _max_and_argmax(masked)
    masked[second, columns] = -np.inf
    third_value = masked.max(axis=0)
    second_value, third_value = np.maximum(second_value, lowest), np.maximum(third_value, lowest)  # K < 3

    # (3) Per group of windows with the same |C| (2 for most): over each window's block of pixels, interpolate
    # (separably, and linear, so differences interpolate as differences) the classes of C minus the first,
    # and the bound (2nd value, or 3rd when the 2nd class is in C) minus the first. The best of C (first on
    # ties, as C ascends) is kept; pixels where it does not beat the bound are `doubtful`.
    inverse_t = np.ascontiguousarray(inverse.T)  # (taps, M)
    sy, sx = ay.window_pos.shape[0], ax.window_pos.shape[0]
    doubtful: list[np.ndarray] = []
    group_of = np.minimum(counts, _MAX_GROUPED_CANDIDATES)
    for group in np.unique(group_of):
        members = np.flatnonzero(group_of == group)
        size = int(counts[members].max())
        cls = classes[members, :size].T  # (C, m); fillers become repeats of the first: no effect on argmax
        cls = np.where(cls == num_classes, cls[:1], cls)
        inv = inverse_t[:, members]  # (taps, m)
        second_in = (second[inv][None] == cls[:, None]).any(axis=0)
        bound = np.where(second_in, third_value[inv], second_value[inv])
        values = vectors.reshape(-1).take(cls[:, None] * len(touched) + inv[None])  # (C, taps, m)
        channels = np.concatenate([values[1:], bound[None]]) - values[:1]  # (C, taps, m)
        channels = channels.reshape(size, ay.taps, ax.taps, len(members))
        chunk = max(1, _CHUNK_ELEMENTS // (sy * sx * size * (ay.taps + 1)))
        for start in range(0, len(members), chunk):
            part = slice(start, start + chunk)
            py, px = wy[members[part]], wx[members[part]]
            scores = _interpolate_windows(channels[..., part], py, px, ay, ax)  # (C, Sy, Sx, m)
            best_score = np.zeros(scores.shape[1:], dtype=scores.dtype)  # the first class's own difference
            best = np.broadcast_to(cls[0, part], scores.shape[1:])
            for c in range(1, size):
                better = scores[c - 1] > best_score
                best_score = np.where(better, scores[c - 1], best_score)
                best = np.where(better, cls[c, part], best)
            # Padded positions repeat a window's last row / column and compute the same: harmless repeats.
            labels[ay.window_pos[:, None, py] * width + ax.window_pos[None, :, px]] = best
            uncertain = best_score <= scores[size - 1]
            if uncertain.any():
                i, j, m = np.nonzero(uncertain)
                m = members[m + start]
                valid = (i < ay.window_size[wy[m]]) & (j < ax.window_size[wx[m]])
                doubtful.append(np.stack([i[valid], j[valid], m[valid]]))
    if not doubtful:
        return True

    # (4) Doubtful pixels: candidates the top-3 classes of every support vector, bound the 4th values.
    i, j, m = np.concatenate(doubtful, axis=1)
    target = ay.window_pos[i, wy[m]] * width + ax.window_pos[j, wx[m]]
    weight = (ay.window_weights[i, :, wy[m], None] * ax.window_weights[j, None, :, wx[m]]).reshape(len(m), taps)
    sup = inverse[m]  # (n, taps)
    third = (masked == masked.max(axis=0)).argmax(axis=0)  # any index of the 3rd value will do
    masked[third, columns] = -np.inf
    fourth_value = np.maximum(masked.max(axis=0), lowest)
    candidates = np.sort(np.concatenate([first[sup], second[sup], third[sup]], axis=1), axis=1)
    best, certain = _argmax_with_bound(vectors, sup, weight, candidates, fourth_value)
    labels[target[certain]] = best[certain]

    # (5) The rest: all K classes.
    rest = np.flatnonzero(~certain)
    if len(rest) > _MAX_FULL_FRACTION * height * width:
        return False
    if len(rest):
        labels[target[rest]] = _full_argmax(vectors, sup[rest], weight[rest])
    return True


def labels_from_logits(logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """(B, K, h, w) logits -> (B, H, W) labels (uint8 when K <= 256, else int32), as the reference.

    Equal to `reference_labels` except possibly where the reference's top two logits are within float32
    rounding of each other (see the module docstring for why).
    """
    num_classes, h, w = logits.shape[1:]
    (mid_h, mid_w), (height, width) = input_size, original_size
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return reference_labels(logits, input_size, original_size)
    logits = logits.detach()
    if (h, w) == (mid_h, mid_w) == (height, width):
        return logits.argmax(dim=1).numpy().astype(_label_dtype(num_classes))
    ay, ax = _axis(h, mid_h, height), _axis(w, mid_w, width)
    if ay.taps * ax.taps > _MAX_TAPS:
        return reference_labels(logits, input_size, original_size)
    out = np.empty((logits.shape[0], height, width), dtype=_label_dtype(num_classes))
    for b in range(logits.shape[0]):
        flat = logits[b].contiguous().reshape(num_classes, h * w).numpy()
        if not _fast_labels(flat, h, w, ay, ax, out[b]):
            out[b] = reference_labels(logits[b : b + 1], input_size, original_size)[0]
    return out


def overlay(image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 (H, W, 3) blended with the class colours of `labels` (H, W): (1 - alpha) * image + alpha * colour."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {labels.shape} differ in size")
    colors = np.asarray(palette, dtype=np.float32)[labels]
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)
