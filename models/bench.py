"""Benchmark: eager torch vs ONNX Runtime per ISR level, against the machine's fp32 matmul ceiling.

    python -m models.bench                       # EDAFormer-T, every level, 512x512 and 1024x2048, batch 1 and 4
    python -m models.bench --quick --json out.json
    python -m models.bench --markdown docs/benchmarks.md   # rewrites the generated block of that section

Units: GMAC = 1e9 multiply-accumulates = 2 GFLOP. "% of ceiling" = 2 * achieved GMAC/s / matmul GFLOP/s,
where the ceiling is the median GFLOP/s of `torch.mm` on large square fp32 matrices, sampled at the
start and before every level's cases of the same run, with the same threads (on a shared machine the
contention then weighs on ceiling and cases alike). GMACs per image come from `models.flops.count_gmacs`.

Timing: one warm-up call, then up to `--repeats` timed calls (fewer when a call is slow: a case spends
about `--case-budget` s); a first call of `--long-call` s or more is the only sample (first-call
overheads are then far below the noise). Medians throughout.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from models.flops import count_gmacs
from models.isr import IsrConfig
from models.onnx_cache import DEFAULT_CACHE_DIR
from models.onnx_runner import OnnxRunner
from models.registry import create_model
from models.spec import Level

log = logging.getLogger(__name__)
DEFAULT_ONNX_DIR = DEFAULT_CACHE_DIR  # the server's SEGSERVE_ONNX_CACHE_DIR default too: one cache for both


@dataclass
class CaseResult:
    backend: str  # "eager" (the faster eager variant), "onnxruntime", "compiled"
    level: str  # the ladder's name of the ISR setting, e.g. 2211-222 for 2211/222
    rank: int
    batch: int
    height: int
    width: int
    gmacs_per_image: float
    ms_per_image: float | None = None
    gmac_per_s: float | None = None
    pct_of_ceiling: float | None = None
    samples_s: list[float] = field(default_factory=list)
    note: str = ""


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
        "onnxruntime": ort.__version__, "platform": platform.platform(),
    }


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


def time_calls(fn: Callable[[], object], repeats: int, budget_s: float, long_s: float,
               warmups: int = 1) -> tuple[list[float], str]:
    """Wall times of `fn` (s): warm-up, then as many timed calls as fit the budget (>= 1)."""
    for _ in range(warmups):  # a compiled forward's first call compiles: it warms nothing up
        start = time.perf_counter()
        fn()
    first = time.perf_counter() - start
    if first >= long_s:
        return [first], "first call only"
    samples = []
    for _ in range(max(1, min(repeats, int(budget_s / max(first, 1e-6))))):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples, ""


def attention_bytes(level: Level, batch: int, height: int, width: int) -> int:
    """Largest attention matrix (B x heads x N x N' fp32) of an EDAFormer forward pass; the unfused paths hold
    two or three of them at once, which is what can exhaust memory at 1024x2048, batch 4."""
    if level.knob != "isr" or not isinstance(level.value, IsrConfig):
        return 0
    isr = level.value
    grids = [(-(-height // s), -(-width // s)) for s in (4, 8, 16, 32)]  # ceil(side / stride)
    encoder = zip(grids, isr.encoder_pools, (1, 2, 4, 8), strict=True)
    decoder = zip(grids[1:], isr.decoder_pools, (2, 4, 8), strict=True)  # c2, c3, c4 branches
    return max(batch * heads * h * w * (h // pool) * (w // pool) * 4 for (h, w), pool, heads in (*encoder, *decoder))


def available_memory() -> int | None:
    value = _proc_field("/proc/meminfo", "MemAvailable")  # "12345 kB"
    return int(value.split()[0]) * 1024 if value else None


def onnx_graphs(model: torch.nn.Module, levels: Sequence[Level], onnx_dir: Path) -> dict[str, Path]:
    """One graph per level from the shared ONNX cache (exported and parity-checked where missing)."""
    from models.onnx_cache import cached_graphs

    paths = cached_graphs(model, levels, onnx_dir)
    return {level.name: paths[0 if len(paths) == 1 else index] for index, level in enumerate(levels)}


Forward = Callable[..., torch.Tensor]  # forward(images, **knob) -> logits


def eager_forward(model: torch.nn.Module, variant: str) -> Forward:
    """The eager model as a `(images, **knob) -> logits` call in the given memory-format variant."""
    if variant == "plain":
        return model
    # Token grids reshaped to (B, C, H, W) are channels-last views already; channels-last weights
    # spare oneDNN a reorder around every depthwise and 1x1 conv.
    net = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return lambda images, **knob: net(images.contiguous(memory_format=torch.channels_last), **knob)


def eager_variant(model: torch.nn.Module, size: tuple[int, int], budget: tuple[int, float, float]) -> dict[str, float]:
    """ms of plain NCHW vs channels_last at batch 1, full compute; the benchmark keeps the faster."""
    images, timings = torch.randn(1, 3, *size), {}
    for variant in ("plain", "channels_last"):
        forward = eager_forward(model, variant)
        with torch.inference_mode():
            samples, _ = time_calls(lambda forward=forward: forward(images), *budget)
        timings[variant] = statistics.median(samples) * 1000
    return timings


def run_bench(args: argparse.Namespace) -> dict[str, object]:
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    model = create_model(args.model, num_classes=args.num_classes, checkpoint=args.checkpoint).eval()
    ladder = model.spec.ladder()
    levels = list(ladder) if args.levels == "all" else [model.spec.level(n) for n in args.levels.split(",")]
    sizes = [tuple(int(side) for side in size.lower().split("x")) for size in args.sizes.split(",")]  # HxW
    batches = [int(b) for b in args.batches.split(",")]
    budget = (args.repeats, args.case_budget, args.long_call)
    report: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "model": args.model,
        "num_classes": model.num_classes, "machine": machine_info(threads),
        "units": "GMAC = 1e9 multiply-accumulates = 2 GFLOP; pct_of_ceiling = 2 * GMAC/s / matmul GFLOP/s",
    }
    rates = matmul_rates(args.matmul_n)
    smallest = min(sizes, key=lambda s: s[0] * s[1])
    report["eager_variants_ms_batch1_full"] = tried = eager_variant(model, smallest, budget)
    report["eager_variant"] = variant = min(tried, key=tried.__getitem__)
    backends = args.backends.split(",")
    forwards: dict[str, Forward] = {"eager": eager_forward(model, variant)} if "eager" in backends else {}
    if "compiled" in backends:
        torch._dynamo.config.cache_size_limit = 64  # one graph per (ISR, shape); the default 8 is too few
        forwards["compiled"] = torch.compile(eager_forward(model, variant), dynamic=False)
    graphs = onnx_graphs(model, levels, Path(args.onnx_dir)) if "onnxruntime" in backends else {}
    results: list[CaseResult] = []
    with tqdm(total=len(sizes) * len(levels) * len(batches) * len(backends), desc="bench", unit="case") as bar:
        for height, width in sizes:
            for level in levels:
                gmacs = count_gmacs(model, height, width, **level.kwargs)
                rates += matmul_rates(args.matmul_n, repeats=3)
                # A session per level, dropped after it: its memory arena keeps the peak of the largest
                # batch, and six such arenas at 1024x2048 would not fit in memory.
                if graphs:
                    forwards["onnxruntime"] = OnnxRunner(graphs[level.name], intra_op_threads=threads)
                for batch in batches:
                    images = torch.randn(batch, 3, height, width)
                    for backend, forward in forwards.items():
                        bar.set_postfix_str(f"{backend} {level.name} {batch}x{height}x{width}")
                        case = CaseResult(backend, level.name, level.rank, batch, height, width, gmacs)
                        _run_case(case, forward, images, level, budget)
                        results.append(case)
                        bar.update()
                forwards.pop("onnxruntime", None)
    ceiling = statistics.median(rates)
    report["ceiling"] = {"n": args.matmul_n, "gflops_median": ceiling, "gflops_samples": rates}
    for case in results:
        case.pct_of_ceiling = None if case.gmac_per_s is None else 100 * 2 * case.gmac_per_s / ceiling
    report["results"] = [asdict(r) for r in results]
    report["verdicts"] = verdicts(report)
    return report


def _run_case(case: CaseResult, forward: Forward, images: torch.Tensor, level: Level,
              budget: tuple[int, float, float]) -> None:
    need, free = 3 * attention_bytes(level, case.batch, case.height, case.width), available_memory()
    if free is not None and need > 0.8 * free:
        case.note = f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"
        log.warning("%s %s batch %d %dx%d %s", case.backend, case.level, case.batch, case.height, case.width, case.note)
        return
    with torch.inference_mode():
        samples, case.note = time_calls(lambda: forward(images, **level.kwargs), *budget,
                                        warmups=1 + (case.backend == "compiled"))
    seconds = statistics.median(samples)
    case.samples_s = samples
    case.ms_per_image = seconds * 1000 / case.batch
    case.gmac_per_s = case.gmacs_per_image * case.batch / seconds


# --- report: verdicts, text table, Markdown block -------------------------------------------------------
MD_START, MD_END = "<!-- models.bench:start -->", "<!-- models.bench:end -->"
MD_HEADING = "## Model: eager torch vs ONNX Runtime, per ISR level"
_LABEL = {"eager": "eager", "compiled": "compile", "onnxruntime": "ORT"}


def _area(r: dict) -> int:
    return r["height"] * r["width"]


def verdicts(report: dict) -> dict[str, object]:
    """The issue's two targets, computed from the measured results (None where a case is missing)."""
    done = [r for r in report["results"] if r["ms_per_image"] is not None]  # type: ignore[union-attr]
    if not done:
        return {}
    small_area = 512 * 512 if any(_area(r) == 512 * 512 for r in done) else min(_area(r) for r in done)
    small = [r for r in done if _area(r) == small_area]
    best = max(small, key=lambda r: r["pct_of_ceiling"])
    out: dict[str, object] = {"ceiling_pct": {
        "target": 40.0, "size": f"{best['height']}x{best['width']}", "pct_of_ceiling": round(best["pct_of_ceiling"], 1),
        "best_path": f"{best['backend']} {best['level']} batch {best['batch']}", "met": best["pct_of_ceiling"] >= 40.0,
    }}
    big = [r for r in done if _area(r) == max(map(_area, done))]
    speedups: dict[str, float] = {}
    for backend, batch in dict.fromkeys((r["backend"], r["batch"]) for r in big):
        by_rank = {r["rank"]: r for r in big if (r["backend"], r["batch"]) == (backend, batch)}
        if 0 in by_rank and max(by_rank) > 0:
            ratio = by_rank[0]["ms_per_image"] / by_rank[max(by_rank)]["ms_per_image"]
            speedups[f"{backend} batch {batch} ({by_rank[max(by_rank)]['level']})"] = round(ratio, 2)
    if speedups:
        out["isr_speedup"] = {"target": 2.0, "size": f"{big[0]['height']}x{big[0]['width']}",
                              "cheapest_vs_full": speedups, "met_on_all_paths": min(speedups.values()) >= 2.0,
                              "met_on_some_path": max(speedups.values()) >= 2.0}
    return out


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    results = report["results"]
    backends = list(dict.fromkeys(r["backend"] for r in results))
    header = ["size", "batch", "ISR level", "GMAC/img"]
    for b in backends:
        header += [f"{_LABEL[b]} ms/img", f"{_LABEL[b]} GMAC/s", f"{_LABEL[b]} % ceil"]
    header.append("best vs full")
    cell = {(r["backend"], r["height"], r["width"], r["batch"], r["rank"]): r for r in results}
    keys = sorted({(r["height"], r["width"], r["batch"], r["rank"], r["level"], r["gmacs_per_image"]) for r in results})
    rows = []
    for height, width, batch, rank, level, gmacs in keys:
        row = [f"{height}x{width}", str(batch), level, f"{gmacs:.2f}"]
        best: list[float] = []
        for b in backends:
            r = cell[(b, height, width, batch, rank)]
            if r["ms_per_image"] is None:
                row += ["skipped", "", ""]
                continue
            row += [f"{r['ms_per_image']:.0f}", f"{r['gmac_per_s']:.1f}", f"{r['pct_of_ceiling']:.0f}%"]
            full = cell.get((b, height, width, batch, 0))
            if full and full["ms_per_image"]:
                best.append(full["ms_per_image"] / r["ms_per_image"])
        row.append(f"{max(best):.2f}x" if best else "")
        rows.append(row)
    return header, rows


def _summary(report: dict) -> list[str]:
    m, c, v = report["machine"], report["ceiling"], report.get("verdicts", {})
    lines = [
        f"{report['model']} ({report['num_classes']} classes), {report['date']}; {m['cpu']}, "
        f"{m['logical_cores']} cores, {m['threads']} threads; torch {m['torch']}, onnxruntime {m['onnxruntime']}",
        f"fp32 matmul ceiling: {c['gflops_median']:.1f} GFLOP/s (torch.mm {c['n']}x{c['n']}, median of "
        f"{len(c['gflops_samples'])} across the run, {min(c['gflops_samples']):.0f}-{max(c['gflops_samples']):.0f}); "
        "GMAC = 2 FLOP, % ceil = 2 x GMAC/s / ceiling",
        f"eager variant: {report['eager_variant']} (batch-1 full-compute ms: "
        + ", ".join(f"{k} {t:.0f}" for k, t in report["eager_variants_ms_batch1_full"].items()) + ")",
    ]
    if "ceiling_pct" in v:
        t = v["ceiling_pct"]
        lines.append(f"target >= 40% of ceiling at {t['size']}: {'MET' if t['met'] else 'NOT MET'} "
                     f"({t['pct_of_ceiling']}%, {t['best_path']})")
    if "isr_speedup" in v:
        t = v["isr_speedup"]
        ratios = ", ".join(f"{k} {x:.2f}x" for k, x in t["cheapest_vs_full"].items())
        state = ("MET on all paths" if t["met_on_all_paths"]
                 else "MET on some paths" if t["met_on_some_path"] else "NOT MET")
        lines.append(f"target cheapest level >= 2x faster than full at {t['size']}: {state} ({ratios})")
    return lines


def format_table(report: dict) -> str:
    header, rows = _rows(report)
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([*_summary(report), "", fmt.format(*header), *(fmt.format(*r) for r in rows)])


def markdown_block(report: dict) -> str:
    header, rows = _rows(report)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    summary = [f"- {line}" for line in _summary(report)]
    return "\n".join([MD_START, *summary, "", *table, MD_END])


def update_markdown(path: Path, report: dict) -> None:
    """Replace the generated block of our section (creating the file or section when missing); text
    outside the markers, including other sections, is kept."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = markdown_block(report)
    if MD_START in text and MD_END in text:
        head, rest = text.split(MD_START, 1)
        text = head + block + rest.split(MD_END, 1)[1]
    elif MD_HEADING in text:
        text = text.replace(MD_HEADING, f"{MD_HEADING}\n\n{block}", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{MD_HEADING}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags, shared by `python -m models.bench` and `segserve bench`."""
    add = parser.add_argument
    add("--model", default="edaformer-t")
    add("--num-classes", type=int, default=150)
    add("--checkpoint", default=None, help="weights to load (random weights time the same)")
    add("--sizes", default="512x512,1024x2048", help="comma-separated HxW")
    add("--batches", default="1,4")
    add("--levels", default="all", help="'all' or comma-separated level names, e.g. 1111-111,2222-222")
    add("--repeats", type=int, default=5, help="timed calls per case at most (after one warm-up)")
    add("--case-budget", type=float, default=6.0, help="seconds a case may spend on timed calls (>= 1 call)")
    add("--long-call", type=float, default=8.0, help="a first call this slow (s) is the case's only sample")
    add("--threads", type=int, default=None, help="torch and ORT intra-op threads (default: all cores)")
    add("--matmul-n", type=int, default=2048, help="side of the square matrices of the ceiling")
    add("--backends", default="eager,onnxruntime", help="of eager, onnxruntime, compiled (torch.compile: "
        "minutes of compiling per ISR level and shape on 2 cores, so not in the default)")
    add("--onnx-dir", default=str(DEFAULT_ONNX_DIR), help="cache of exported graphs")
    add("--seed", type=int, default=0)
    add("--quick", action="store_true", help="smoke run: 256x256, batch 1, full and cheapest levels, 1 repeat")
    add("--json", default=None, help="write the full report here")
    add("--markdown", default=None, help="create/update this Markdown file's model benchmark section")


def run_from_args(args: argparse.Namespace) -> int:
    if args.quick:
        args.sizes, args.batches, args.repeats, args.matmul_n = "256x256", "1", 1, 1024
        if args.levels == "all":
            from models.registry import get_spec

            ladder = get_spec(args.model).ladder()
            args.levels = ",".join(dict.fromkeys([ladder[0].name, ladder[-1].name]))
    report = run_bench(args)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        update_markdown(Path(args.markdown), report)
        print(f"updated {args.markdown}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
