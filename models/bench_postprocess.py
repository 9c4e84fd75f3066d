"""Times `labels_from_logits` against the dense reference (two bilinear resizes, then argmax).

    python -m models.bench_postprocess [--threads 2] [--repeats 15]

Prints, per case, the median wall-clock time of each over `repeats` runs, the speedup, the new path's median
process CPU time (it is single-threaded numpy: on a box shared with other processes this is close to what it
takes when it gets a core to itself), and whether the masks agree outside float32 near-ties. The load
average is printed too: on a shared 2-core box both wall-clock columns move with it.

Logits kinds: "smooth" looks like a segmenter's output (a dozen blobs with soft edges, smooth per-class
scores, a little noise); "busy" has 60 blobs with weaker margins (many boundary pixels); "noise" is i.i.d.
Gaussian (almost every pixel is on a boundary: the worst case, which hands over to the reference).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models.postprocess import labels_from_logits, reference_labels, resize_logits


def smooth_logits(
    rng: np.random.Generator,
    shape: tuple[int, int, int, int],
    regions: int = 12,
    margin: float = 6.0,
    noise: float = 0.3,
) -> torch.Tensor:
    """Logits that look like a segmenter's: `regions` blobs (a warped Voronoi map of random classes) whose
    class leads by about `margin` with soft 2-3 cell transitions, over smooth random per-class scores
    (std ~1.5), plus i.i.d. noise of std `noise` per low-res cell and class.
    """
    batch, classes, h, w = shape
    out = []
    for _ in range(batch):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        seeds = rng.uniform(0, 1, (regions, 2)) * (h, w)
        warp = 0.15 * min(h, w) * np.sin(yy / max(h, 1) * 7 + rng.uniform(0, 6)) * np.cos(xx / max(w, 1) * 5)
        dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] + warp[None] - seeds[:, 1, None, None]) ** 2
        region_class = torch.from_numpy(rng.integers(0, classes, regions)[dist.argmin(axis=0)])
        winner = F.one_hot(region_class, classes).permute(2, 0, 1).float()[None]
        for _ in range(2):  # soften the transitions
            winner = F.avg_pool2d(winner, 3, stride=1, padding=1, count_include_pad=False)
        coarse = torch.from_numpy(rng.standard_normal((1, classes, h // 8 + 2, w // 8 + 2)).astype(np.float32))
        background = 1.5 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        jitter = noise * torch.from_numpy(rng.standard_normal((1, classes, h, w)).astype(np.float32))
        out.append(background + margin * winner + jitter)
    return torch.cat(out).contiguous()


def noise_logits(rng: np.random.Generator, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """I.i.d. Gaussian logits: nearly every output pixel sits on a class boundary (the worst case)."""
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU time of `fn`, in ms, after one warm-up call."""
    fn()  # warm-up (caches, allocator)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - start) * 1000.0)
        cpu.append((time.process_time() - start_cpu) * 1000.0)
    return statistics.median(wall), statistics.median(cpu)


def agreement(logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> str:
    """'ok' when every pixel where the reference's top-2 gap is >= 1e-4 agrees; else the count that differ."""
    full = resize_logits(resize_logits(logits, input_size), original_size)
    top2 = full.topk(2, dim=1).values
    clear = ((top2[:, 0] - top2[:, 1]) >= 1e-4).numpy()
    new = labels_from_logits(logits, input_size, original_size)
    differ = new != reference_labels(logits, input_size, original_size)
    bad = int((differ & clear).sum())
    return "ok" if bad == 0 else f"{bad} differ"


Shape = tuple[int, int, int, int]
CASES: list[tuple[str, Shape, tuple[int, int], tuple[int, int]]] = [
    # (logits kind, (B, K, h, w), network input size, original size)
    ("smooth", (1, 150, 64, 64), (512, 512), (512, 512)),
    ("smooth", (1, 150, 64, 88), (512, 704), (512, 683)),
    ("busy", (1, 150, 64, 88), (512, 704), (512, 683)),
    ("noise", (1, 150, 64, 88), (512, 704), (512, 683)),
    ("smooth", (1, 150, 64, 96), (512, 768), (300, 450)),
    ("smooth", (1, 19, 128, 256), (1024, 2048), (1000, 1900)),
    ("smooth", (1, 19, 1024, 2048), (1024, 2048), (1000, 1900)),
]


def make_logits(kind: str, rng: np.random.Generator, shape: Shape) -> torch.Tensor:
    if kind == "smooth":
        return smooth_logits(rng, shape)
    if kind == "busy":  # many small regions, weaker margins: more boundary pixels
        return smooth_logits(rng, shape, regions=60, margin=4.0)
    return noise_logits(rng, shape)


def _row(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    """Table row: the first two cells left-aligned, the others right-aligned."""
    pairs = enumerate(zip(cells, widths, strict=True))
    return " ".join(f"{c:<{wd}}" if k < 2 else f"{c:>{wd}}" for k, (c, wd) in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per case (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}, load avg {load}")
    widths = (7, 20, 10, 10, 8, 7, 8, 8)
    names = ("logits", "(B, K, h, w)", "input", "original", "ref ms", "new ms", "speedup", "new cpu")
    header = _row(names, widths)
    print(f"{header}  mask")
    print("-" * (len(header) + 6))
    with torch.inference_mode():
        for kind, shape, input_size, original_size in CASES:
            logits = make_logits(kind, rng, shape)
            sizes = (logits, input_size, original_size)
            ref, _ = median_ms(functools.partial(reference_labels, *sizes), args.repeats)
            new, new_cpu = median_ms(functools.partial(labels_from_logits, *sizes), args.repeats)
            check = agreement(logits, input_size, original_size)
            cells = (kind, str(shape), "x".join(map(str, input_size)), "x".join(map(str, original_size)))
            cells += (f"{ref:.1f}", f"{new:.1f}", f"{ref / new:.1f}x", f"{new_cpu:.1f}")
            print(f"{_row(cells, widths)}  {check}")


if __name__ == "__main__":
    main()
