"""Measurement helpers of `models.bench`: the machine, its load, the fp32 matmul ceiling, interleaved timing of
several backends, and the eager forward's memory-format variants."""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from models.isr import IsrConfig
from models.spec import Level

Forward = Callable[..., torch.Tensor]  # forward(images, **knob) -> logits


def _proc_field(path: str, key: str) -> str | None:  # `key: value` lines of /proc files; None off Linux
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), None)


def machine_info(threads: int) -> dict[str, object]:
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor(), "logical_cores": os.cpu_count(),
        "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": ort.__version__, "platform": platform.platform(), "nice": os.nice(0),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def matmul_rates(n: int = 2048, repeats: int = 7) -> list[float]:
    """fp32 GFLOP/s of torch.mm(n x n, n x n) calls: 2 n^3 FLOP per call."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool and MKL/oneDNN dispatch
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return rates


def matmul_call(n: int = 2048) -> tuple[Callable[[], object], float]:
    """A `torch.mm(n x n, n x n)` call and its GFLOP (2 n^3 / 1e9): timed among a case's calls, it gives the
    fp32 ceiling under the load of that very case."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda: torch.mm(a, b)), 2 * n**3 / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


MAX_ROUNDS = 5


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, budget_s: float, long_s: float,
                     warmups: dict[str, int] | None = None) -> dict[str, tuple[list[float], int, str]]:
    """Wall times (s) per call, the number of rounds they were taken in, and a note.

    After the warm-ups, each call gets as many timed runs as `budget_s` allows (>= 1, <= `repeats`), taken in up
    to MAX_ROUNDS rounds; a round runs one block per call, back to back, so that the calls of one round share
    the machine's load of that moment: per-round ratios between calls (`paired_ratio`) cancel a drifting load
    that the ratio of medians does not. A block of a cheap call (< 1 s) starts with one untimed run: the
    previous block's runtime leaves threads spinning (ORT's pool, OpenMP), and on 2 cores they would slow the
    first run of the other runtime several-fold. A call whose first run took `long_s` or more keeps that run as
    its only sample (1 round)."""
    first = {}
    for name, fn in calls.items():
        for _ in range(max(1, (warmups or {}).get(name, 1))):  # a compiled forward's first call only compiles
            first[name] = _timed(fn)
    out: dict[str, tuple[list[float], int, str]] = {
        n: ([t], 1, "first call only") for n, t in first.items() if t >= long_s}
    active = [n for n in calls if n not in out]
    wanted = {n: max(1, min(repeats, int(budget_s / max(first[n], 1e-6)))) for n in active}
    rounds = min(MAX_ROUNDS, min(wanted.values(), default=1))
    samples: dict[str, list[float]] = {n: [] for n in active}
    for _ in range(rounds):
        for name in active:
            if first[name] < 1.0:
                calls[name]()
            samples[name] += [_timed(calls[name]) for _ in range(-(-wanted[name] // rounds))]
    return {**out, **{n: (s, rounds, "") for n, s in samples.items()}}


def paired_ratio(slow: tuple[list[float], int], fast: tuple[list[float], int]) -> float:
    """How many times faster `fast` ran than `slow`, each given as (samples, rounds) from `time_interleaved`:
    the median over rounds of the ratio of the two blocks' medians (a round's load weighs on both), or the
    ratio of the medians when they were not timed in the same rounds."""
    (a, rounds_a), (b, rounds_b) = slow, fast
    if rounds_a == rounds_b > 1 and len(a) % rounds_a == 0 and len(b) % rounds_b == 0:
        na, nb = len(a) // rounds_a, len(b) // rounds_b
        return statistics.median(statistics.median(a[i * na:(i + 1) * na]) / statistics.median(b[i * nb:(i + 1) * nb])
                                 for i in range(rounds_a))
    return statistics.median(a) / statistics.median(b)


def attention_bytes(level: Level, batch: int, height: int, width: int) -> int:
    """Largest attention matrix (B x heads x N x N' fp32) of an EDAFormer forward pass; the unfused paths hold
    two or three of them at once, which is what can exhaust memory at 1024x2048, batch 4. 0 for other knobs."""
    if level.knob != "isr" or not isinstance(level.value, IsrConfig) or len(level.value.decoder_pools) != 3:
        return 0
    isr = level.value
    grids = [(-(-height // s), -(-width // s)) for s in (4, 8, 16, 32)]  # ceil(side / stride)
    encoder = zip(grids, isr.encoder_pools, (1, 2, 4, 8), strict=True)
    decoder = zip(grids[1:], isr.decoder_pools, (2, 4, 8), strict=True)  # c2, c3, c4 branches
    return max(batch * heads * h * w * (h // pool) * (w // pool) * 4 for (h, w), pool, heads in (*encoder, *decoder))


def available_memory() -> int | None:
    value = _proc_field("/proc/meminfo", "MemAvailable")  # "12345 kB"
    return int(value.split()[0]) * 1024 if value else None


def eager_forward(model: torch.nn.Module, variant: str) -> Forward:
    """The eager model as a `(images, **knob) -> logits` call in the given memory-format variant."""
    if variant == "plain":
        return model
    # Token grids reshaped to (B, C, H, W) are channels-last views already; channels-last weights
    # spare oneDNN a reorder around every depthwise and 1x1 conv.
    net = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return lambda images, **knob: net(images.contiguous(memory_format=torch.channels_last), **knob)


def eager_variant(model: torch.nn.Module, images: torch.Tensor, budget: tuple[int, float, float]) -> dict[str, float]:
    """ms of plain NCHW vs channels_last at full compute, interleaved; the benchmark keeps the faster."""
    forwards = {variant: eager_forward(model, variant) for variant in ("plain", "channels_last")}
    with torch.inference_mode():
        timed = time_interleaved({v: (lambda f=f: f(images)) for v, f in forwards.items()}, *budget)
    return {variant: statistics.median(samples) * 1000 for variant, (samples, _, _) in timed.items()}
