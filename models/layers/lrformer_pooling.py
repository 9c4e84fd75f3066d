"""LRFormer's fixed-size pooling: aspect-aware pooled sizes and an adaptive average pooling that exports.

LRSA pools every feature map to a size fixed on the *short* side (`s`) and scaled on the long side by the
aspect ratio, rounded as the official code does: `round(long * s / short + 0.001)` (Python floats). Here that
is integer arithmetic, `(1000 * long * s + 501 * short) // (1000 * short)`, which equals the float formula for
every short side below 500 (tested) and needs no branch on the orientation (a branch would freeze an exported
graph to the example's orientation).

`F.adaptive_avg_pool2d` is what the official code runs and what eager mode runs here. Exporters cannot keep it
dynamic: the dynamo exporter silently bakes the example's bins into the graph (wrong values, even wrong
shapes, at other sizes) and the TorchScript exporter refuses non-divisible sizes. While exporting or tracing,
the same pooling is therefore `A_h X A_w^T`, with averaging matrices built from the shape: bin i of n inputs
into o outputs is [floor(i n / o), ceil((i + 1) n / o)), i.e. element r is inside iff -n < i n - r o < o
(integer products only, which keeps the exported graph small).

Export cost shaped this module (LRFormer-T's first export took 10 minutes): every symbolic size costs
`torch.export` sympy work and graph nodes, and the ONNX optimizer pairs up Slice nodes quadratically. So the pooled
sizes are computed once per forward and grid (read back from tensors as fresh size symbols), each stage plans
its pools once for all of its blocks, and the window matrices of a grid are built in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SymSize = int | torch.SymInt


def is_exporting() -> bool:
    """Whether an exporter or tracer is recording this call (shapes may be symbolic)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def rounded_ratio(long_side: SymSize, short_side: SymSize, size: int) -> SymSize:
    """`round(long_side * size / short_side + 0.001)` of the official code, in integer arithmetic."""
    return (1000 * long_side * size + 501 * short_side) // (1000 * short_side)


def aspect_pooled_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The official pooled size: `size` on the short side, the long side scaled by the aspect ratio.

    With `short = min(height, width)`, `rounded_ratio(short, short, size)` is exactly `size` (501 < 1000).
    """
    short = min(height, width)
    return rounded_ratio(height, short, size), rounded_ratio(width, short, size)


class PooledSizes:
    """The aspect-aware sizes (out_height, out_width) of one grid for several targets, in order, the first the
    largest (the query's); while exporting also as an int64 tensor (k, 2) that the window matrices are built from.
    """

    def __init__(self, sizes: list[tuple[SymSize, SymSize]], table: torch.Tensor | None = None) -> None:
        self.sizes = sizes
        self.table = table


def pooled_sizes(height: SymSize, width: SymSize, targets: Sequence[int] | torch.Tensor) -> PooledSizes:
    """`aspect_pooled_size` of one grid for each target size: plain ints in eager mode.

    While exporting (symbolic sides, or the targets a tensor: the knob as a graph input) they are computed in one
    tensor expression and read back as fresh size symbols, checked >= 1: symbolic floor divisions of the stage
    sizes made `torch.export` several times slower, and this also lets one graph serve every pooled size.
    """
    if isinstance(height, int) and isinstance(width, int) and not isinstance(targets, torch.Tensor):
        return PooledSizes([aspect_pooled_size(height, width, size) for size in targets])
    sides = torch.stack([torch.scalar_tensor(height, dtype=torch.int64), torch.scalar_tensor(width, dtype=torch.int64)])
    short = sides.min()
    if not isinstance(targets, torch.Tensor):
        targets = torch.tensor(list(targets), dtype=torch.int64)
    # (k, 2); unsqueeze, not [:, None]: that exports as no-op Slice nodes (see plan_pools)
    table = (1000 * targets.unsqueeze(1) * sides.unsqueeze(0) + 501 * short) // (1000 * short)
    sizes = []
    for index in range(table.shape[0]):
        out_height, out_width = table[index, 0].item(), table[index, 1].item()
        torch._check(out_height >= 1)
        torch._check(out_width >= 1)
        sizes.append((out_height, out_width))
    return PooledSizes(sizes, table)


def pyramid_sizes(pooled_size: int, base: tuple[int, ...] = (11, 8, 6, 4)) -> tuple[int, ...]:
    """K/V pyramid sizes for a query pooled size: `round(p * s / 16 + 0.001)` (11/8/6/4 at s = 16)."""
    return tuple(round(p * pooled_size / 16 + 0.001) for p in base)


def query_and_pyramid_sizes(pooled_size: int | torch.Tensor) -> tuple[int, ...] | torch.Tensor:
    """(s, *pyramid_sizes(s)); for a scalar tensor s (a graph input), the same as an int64 tensor (5,).

    round(p s / 16 + 0.001) never meets a tie (p s / 16 has sixteenths), so it is floor((1000 p s + 8016) / 16000).
    """
    if not isinstance(pooled_size, torch.Tensor):
        return (pooled_size, *pyramid_sizes(pooled_size))
    size = pooled_size.round().to(torch.int64).reshape(1)
    base = torch.tensor((11, 8, 6, 4), dtype=torch.int64)
    return torch.cat([size, (1000 * base * size + 8016) // 16000])


def window_matrices(length: SymSize, bins: torch.Tensor, max_bins: SymSize, like: torch.Tensor) -> torch.Tensor:
    """Averaging matrices (k, max_bins, length) of adaptive pooling of `length` inputs into each of `bins` (k,)
    outputs, in the dtype of `like`: row i of target j holds 1 / window size over its window. Rows past a target's
    bin count are 0.

    Output i takes input r iff floor(i n / o) <= r < ceil((i + 1) n / o), i.e. iff -n < i n - r o < o.
    """
    index = torch.arange(max_bins, device=like.device).view(1, -1, 1)
    position = torch.arange(length, device=like.device).view(1, 1, -1)
    bins = bins.to(like.device).view(-1, 1, 1)
    offset = index * length - position * bins
    windows = ((offset < bins) & (offset > -length)).to(like.dtype)
    return windows / windows.sum(dim=2, keepdim=True).clamp_min(1)


class GridPool:
    """Adaptive average pooling of (B, C, height, width) maps to one `out_size`.

    Eager mode runs `F.adaptive_avg_pool2d`, the official arithmetic. Exported graphs run `A_h X A_w^T` with the
    averaging matrices of `plan_pools`, which agrees with it to float rounding (a few 1e-7 relative).
    """

    def __init__(self, out_size: tuple[SymSize, SymSize],
                 matrices: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.out_height, self.out_width = out_size
        self.matrices = matrices

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, height, width) -> (B, C, out_height, out_width)."""
        if self.matrices is None:
            return F.adaptive_avg_pool2d(x, (int(self.out_height), int(self.out_width)))
        rows, cols_t = self.matrices
        return torch.matmul(torch.matmul(rows, x), cols_t)


def plan_pools(height: SymSize, width: SymSize, pooled: PooledSizes, like: torch.Tensor) -> list[GridPool]:
    """The pools of a (height, width) grid to each of `pooled.sizes`, planned once for all blocks on that grid
    (a local value of the forward, never module state). While exporting, the averaging matrices of all targets
    are built in one batch per axis and sliced (the first target is the largest): few graph nodes, which keeps
    the export fast."""
    if not is_exporting():
        return [GridPool(size) for size in pooled.sizes]
    table = pooled.table
    if table is None:  # every size static (traced at a fixed size): build the table anyway
        table = torch.tensor(pooled.sizes, dtype=torch.int64)
    max_height, max_width = pooled.sizes[0]
    rows = window_matrices(height, table.select(1, 0), max_height, like)
    cols_t = window_matrices(width, table.select(1, 1), max_width, like).transpose(1, 2)
    # select/narrow, not unbind/[:n], and no narrow for the largest target: Slice nodes are what the ONNX
    # optimizer pairs up quadratically (it dominated the export's time)
    pools = [GridPool(pooled.sizes[0], (rows.select(0, 0), cols_t.select(0, 0)))]
    for index, (out_height, out_width) in enumerate(pooled.sizes[1:], start=1):
        row = rows.select(0, index).narrow(0, 0, out_height)
        col_t = cols_t.select(0, index).narrow(1, 0, out_width)
        pools.append(GridPool((out_height, out_width), (row, col_t)))
    return pools


def matrix_adaptive_avg_pool2d(x: torch.Tensor, out_height: int, out_width: int) -> torch.Tensor:
    """The exported form of `F.adaptive_avg_pool2d(x, (out_height, out_width))`, runnable in eager mode."""
    B, C, H, W = x.shape
    rows = window_matrices(H, torch.tensor([out_height]), out_height, x)[0]
    cols = window_matrices(W, torch.tensor([out_width]), out_width, x)[0]
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))
