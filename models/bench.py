"""Benchmark of every registered model per knob level: eager torch, ONNX Runtime fp32 and int8, against the
machine's fp32 matmul ceiling, with GMACs and the published mIoU.

    python -m models.bench --model segformer-b0            # one model, every level (512x512; 1024x2048 too for
                                                           # the smallest variant of its family), batch 1
    python -m models.bench --all --json zoo.json --markdown docs/benchmarks.md --plot docs/img/zoo_pareto.png
    python -m models.bench --model edaformer-t --sizes 512x512,1024x2048 --batches 1,4 --backends eager,onnxruntime \\
        --detail-markdown docs/benchmarks.md               # the per-level ISR analysis block of one model
    python -m models.bench --list                          # models, knob ladders, published mIoU

Units: GMAC = 1e9 multiply-accumulates = 2 GFLOP (`models.flops.count_gmacs`; DoViT's is the dense count, the
upper bound at any threshold). "% of ceiling" = 2 * achieved GMAC/s / matmul GFLOP/s, where the ceiling is the
median GFLOP/s of fp32 `torch.mm` on 2048x2048 matrices, with the same threads, timed among the case's own
calls (so a busy moment lowers both; on a shared machine the run's ceiling varied 3-7x). int8 rates use the same
MAC count and the same fp32 ceiling.

Timing: the backends of one case run interleaved (one warm-up each, then up to 5 rounds of a block of calls
per backend, the matmul of the ceiling among them), so that a shared machine's contention weighs on all of them
alike and their ratios stay meaningful (int8 speed-ups are paired by round, `bench_timing.paired_ratio`); up to
`--repeats` timed calls within `--case-budget` s per backend; a first call of `--long-call` s or more is the
only sample. Medians throughout. OpenMP threads wait passively (`OMP_WAIT_POLICY=PASSIVE`, set by
`segserve` and by `python -m models.bench`): spinning ones make eager torch erratic on a shared machine.
Inputs are photo-like images normalized as the model's pipeline does (DoViT's token exits depend on the data).
Without a checkpoint the weights are random (seeded) with BatchNorm statistics from photo-like images
(`models.quantize.calibrate_batchnorm_`), so that int8 agreement is measured on structured masks; the timings
do not depend on the weights' values (DoViT's exits aside: random aux heads stop no token).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models.bench_report import zoo_order
from models.bench_timing import (
    Forward,
    attention_bytes,
    available_memory,
    eager_forward,
    eager_variant,
    load_average,
    machine_info,
    matmul_call,
    matmul_rates,
    time_interleaved,
)
from models.flops import count_gmacs
from models.onnx_cache import DEFAULT_CACHE_DIR, cached_graphs
from models.onnx_runner import OnnxRunner
from models.predict import preprocess
from models.quantize import (
    calibrate_batchnorm_,
    default_recipe,
    int8_graphs,
    mask_agreement,
    model_pipeline,
    network_inputs,
    photo_like_images,
)
from models.registry import create_model, get_spec, list_models
from models.spec import Level

log = logging.getLogger(__name__)
DEFAULT_ONNX_DIR = DEFAULT_CACHE_DIR  # the server's SEGSERVE_ONNX_CACHE_DIR default too: one cache for both
GMAC_SIZES = ((512, 512), (1024, 2048))  # GMACs reported per level (counted, never timed unless asked)
CEILING = "ceiling"  # the matmul call timed among each case's backends
BACKENDS = ("eager", "onnxruntime", "int8", "compiled")


@dataclass
class CaseResult:
    backend: str  # "eager" (the faster eager variant), "onnxruntime" (fp32), "int8" (ORT int8), "compiled"
    level: str  # the ladder's name of the knob setting, e.g. 2211-222
    rank: int
    batch: int
    height: int
    width: int
    gmacs_per_image: float
    ms_per_image: float | None = None
    gmac_per_s: float | None = None
    pct_of_ceiling: float | None = None
    samples_s: list[float] = field(default_factory=list)
    rounds: int = 1  # samples_s holds `rounds` equal blocks, one per round of interleaved timing
    ceiling_gflops: float | None = None  # fp32 torch.mm GFLOP/s timed among this case's calls (the local ceiling)
    note: str = ""


def photo_input(model: torch.nn.Module, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(batch, 3, height, width) photo-like images normalized as the model's pipeline does."""
    pipeline = model_pipeline(model)
    images = photo_like_images(batch, height, width, seed)
    return torch.cat([preprocess(image, (height, width), pipeline.mean, pipeline.std) for image in images])


def smallest_of_families(names: Sequence[str]) -> set[str]:
    """The cheapest variant (GMACs at 512x512) of each family among `names`."""
    best: dict[str, tuple[float, str]] = {}
    for name in names:
        spec = get_spec(name)
        cost = spec.reference_gmacs_512 if spec.reference_gmacs_512 is not None else float("inf")
        if spec.family not in best or (cost, name) < best[spec.family]:
            best[spec.family] = (cost, name)
    return {name for _, name in best.values()}


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(side) for side in size.lower().split("x")) for size in text.split(",") if size]  # type: ignore[misc]


def bench_model(name: str, args: argparse.Namespace, threads: int, rates: list[float], extra_sizes: bool
                ) -> dict[str, object]:
    """One model's cases, level information (GMACs, published mIoU, int8 agreement) and settings."""
    torch.manual_seed(args.seed)
    model = create_model(name, num_classes=args.num_classes, checkpoint=args.checkpoint).eval()
    spec = model.spec
    if not args.checkpoint:
        calibrate_batchnorm_(model, torch.cat(network_inputs(model, photo_like_images(2, 512, 512, args.seed))))
    ladder = list(spec.ladder())
    if args.levels == "all":
        levels = ladder
    elif args.levels == "ends":  # the training setting and the cheapest level: the span of the model's knob
        levels = list(dict.fromkeys([ladder[0], ladder[-1]]))
    else:
        levels = [spec.level(n) for n in args.levels.split(",")]
    sizes = _sizes(args.sizes) + (_sizes(args.smallest_sizes) if extra_sizes else [])
    batches = [int(b) for b in args.batches.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    budget = (args.repeats, args.case_budget, args.long_call)
    report: dict[str, object] = {
        "model": name, "family": spec.family, "num_classes": model.num_classes,
        "weights": args.checkpoint or "random (seeded; BatchNorm statistics from photo-like images)",
        "dense_gmacs": callable(getattr(model, "count_gmacs", None)),
    }
    info = []
    for level in levels:
        gmacs = {f"{h}x{w}": round(count_gmacs(model, h, w, **level.kwargs), 3) for h, w in GMAC_SIZES}
        info.append({"level": level.name, "rank": level.rank, "gmacs": gmacs,
                     "published_miou": spec.published_miou.get("ade20k") if level.rank == 0 else None})
    report["levels"] = info
    first_size = sizes[0]
    if "eager" in backends or "compiled" in backends:
        report["eager_variants_ms_batch1_full"] = tried = eager_variant(
            model, photo_input(model, 1, *first_size, args.seed), budget)
        report["eager_variant"] = min(tried, key=tried.__getitem__)
    forwards: dict[str, Forward] = {}
    if "eager" in backends:
        forwards["eager"] = eager_forward(model, str(report["eager_variant"]))
    if "compiled" in backends:
        torch._dynamo.config.cache_size_limit = 64  # one graph per (knob, shape); the default 8 is too few
        forwards["compiled"] = torch.compile(eager_forward(model, str(report["eager_variant"])), dynamic=False)
    onnx_dir = Path(args.onnx_dir)
    fp32_paths = cached_graphs(model, levels, onnx_dir) if {"onnxruntime", "int8"} & set(backends) else []
    int8_paths: list[Path] = []
    if "int8" in backends:
        report["int8_recipe"] = asdict(default_recipe(spec))
        try:
            int8_paths = int8_graphs(model, levels, onnx_dir)
        except Exception as exc:  # quantization is optional: the fp32 cases still say something
            log.exception("int8 quantization of %s failed; timing it without int8", name)
            report["int8_error"] = f"{type(exc).__name__}: {exc}"
            backends.remove("int8")

    def graph(paths: list[Path], index: int) -> Path:
        return paths[0 if len(paths) == 1 else index]

    results: list[CaseResult] = []
    with tqdm(total=len(sizes) * len(levels) * len(batches), desc=f"bench {name}", unit="case") as bar:
        for height, width in sizes:
            for index, level in enumerate(levels):
                gmacs = count_gmacs(model, height, width, **level.kwargs)
                report.setdefault("load_average", []).append(load_average())  # type: ignore[union-attr]
                # Sessions per level, dropped after it: an arena keeps the peak of the largest batch.
                runners = {}
                if "onnxruntime" in backends:
                    runners["onnxruntime"] = OnnxRunner(graph(fp32_paths, index), intra_op_threads=threads)
                if "int8" in backends:
                    runners["int8"] = OnnxRunner(graph(int8_paths, index), intra_op_threads=threads)
                for batch in batches:
                    bar.set_postfix_str(f"{level.name} {batch}x{height}x{width}")
                    images = photo_input(model, batch, height, width, args.seed + 1)
                    cases = [CaseResult(b, level.name, level.rank, batch, height, width, gmacs) for b in backends]
                    _run_cases(cases, {**forwards, **runners}, images, level, budget, args.matmul_n, rates)
                    results += cases
                    bar.update()
                if (height, width) == first_size:
                    _level_extras(info[index], model, runners, level, args, stats_input=images[:1])
    report["results"] = [asdict(r) for r in results]
    return report


def _level_extras(info: dict, model: torch.nn.Module, runners: dict[str, OnnxRunner], level: Level,
                  args: argparse.Namespace, stats_input: torch.Tensor) -> None:
    """int8 mask agreement with fp32 ORT, and the statistics a family reports (DoViT's kept fractions)."""
    if model.spec.stats:
        with torch.inference_mode():
            _, stats = model.forward_with_stats(stats_input, **level.kwargs)
        info["stats"] = {key: [round(float(v), 3) for v in value[0].reshape(-1)] for key, value in stats.items()}
    if "int8" in runners and "onnxruntime" in runners and args.agreement_sizes:
        pairs = mask_agreement(runners["onnxruntime"], runners["int8"], model, level, _sizes(args.agreement_sizes))
        info["int8_agreement"] = [round(a, 4) for a, _ in pairs]
        info["fp32_mask_classes"] = [classes for _, classes in pairs]


def _run_cases(cases: list[CaseResult], forwards: dict[str, Forward], images: torch.Tensor, level: Level,
               budget: tuple[int, float, float], matmul_n: int, rates: list[float]) -> None:
    """Times the cases' backends interleaved with the fp32 matmul (the local ceiling, also added to `rates`)."""
    first = cases[0]
    need, free = 3 * attention_bytes(level, first.batch, first.height, first.width), available_memory()
    if free is not None and need > 0.8 * free:
        for case in cases:
            case.note = f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"
        log.warning("%s batch %d %dx%d %s", first.level, first.batch, first.height, first.width, first.note)
        return
    calls = {c.backend: (lambda f=forwards[c.backend]: f(images, **level.kwargs)) for c in cases}
    matmul, gflop = matmul_call(matmul_n)
    repeats, budget_s, long_s = budget
    with torch.inference_mode():
        timed = time_interleaved({**calls, CEILING: matmul}, repeats, budget_s, long_s, warmups={"compiled": 2})
    local = [gflop / t for t in timed[CEILING][0]]
    rates += local
    for case in cases:
        case.ceiling_gflops = statistics.median(local)
        samples, case.rounds, case.note = timed[case.backend]
        seconds = statistics.median(samples)
        case.samples_s = samples
        case.ms_per_image = seconds * 1000 / case.batch
        case.gmac_per_s = case.gmacs_per_image * case.batch / seconds


def _resumed(args: argparse.Namespace, names: Sequence[str]) -> dict | None:
    """The report of an earlier run in `--json`, when resuming one with the same models."""
    if not (args.resume and args.json and Path(args.json).is_file()):
        return None
    earlier = json.loads(Path(args.json).read_text())
    earlier["models"] = [m for m in earlier.get("models", []) if m["model"] in names and "error" not in m]
    return earlier


def _finish(report: dict[str, object], rates: list[float], args: argparse.Namespace, start: float) -> None:
    """Ceiling, % of ceiling and verdicts from every sample so far; written to `--json` (after each model)."""
    from models.bench_report import verdicts

    ceiling = statistics.median(rates)
    report["ceiling"] = {"n": args.matmul_n, "gflops_median": ceiling, "gflops_samples": [round(r, 1) for r in rates]}
    for model_report in report["models"]:  # type: ignore[union-attr]
        for case in model_report.get("results", []):
            rate, local = case["gmac_per_s"], case.get("ceiling_gflops") or ceiling
            case["pct_of_ceiling"] = None if rate is None else 100 * 2 * rate / local
        model_report["verdicts"] = verdicts(model_report) if model_report.get("results") else {}
    report["load_average_end"] = load_average()
    report["wall_s"] = round(float(report.get("wall_s_before", 0)) + time.perf_counter() - start, 1)  # type: ignore[arg-type]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def run_bench(args: argparse.Namespace) -> dict[str, object]:
    """Every named model's report, with the machine, the matmul ceiling and the load over the run. A model that
    fails is reported with its error and the run goes on; `--resume` keeps the models an earlier `--json` has."""
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    names = zoo_order(list_models()) if args.all else [n.strip() for n in args.model.split(",") if n.strip()]
    for name in names:
        get_spec(name)  # KeyError listing the known names before anything runs
    if args.checkpoint and len(names) > 1:
        raise ValueError("--checkpoint needs exactly one --model")
    smallest = smallest_of_families(list_models())
    report: dict[str, object] = _resumed(args, names) or {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine_info(threads),
        "units": "GMAC = 1e9 multiply-accumulates = 2 GFLOP; pct_of_ceiling = 2 * GMAC/s / matmul GFLOP/s",
        "load_average_start": load_average(), "sizes": _sizes(args.sizes), "extra_sizes": _sizes(args.smallest_sizes),
        "models": [],
    }
    report["wall_s_before"] = report.get("wall_s", 0)
    start = time.perf_counter()
    rates = [*report.get("ceiling", {}).get("gflops_samples", []), *matmul_rates(args.matmul_n)]  # type: ignore[union-attr]
    done = {m["model"]: m for m in report["models"]}  # type: ignore[union-attr]
    models = []
    for name in names:
        if name not in done:
            try:
                done[name] = bench_model(name, args, threads, rates, name in smallest)
            except Exception as exc:  # one model's failure must not cost the hours spent on the others
                log.exception("benchmark of %s failed", name)
                done[name] = {"model": name, "family": get_spec(name).family, "error": f"{type(exc).__name__}: {exc}"}
        models.append(done[name])
        report["models"] = models + [m for n, m in done.items() if n not in names]
        _finish(report, rates, args, start)
    report["models"] = models
    _finish(report, rates, args, start)
    return report


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags, shared by `python -m models.bench` and `segserve bench`."""
    add = parser.add_argument
    add("--model", default="edaformer-t", help="a registered model, or a comma-separated list")
    add("--all", action="store_true", help="every registered model (`--list` shows them)")
    add("--list", action="store_true", help="list the models, their knob ladders and published mIoU, and exit")
    add("--num-classes", type=int, default=150)
    add("--checkpoint", default=None, help="weights to load (one model only; random weights time the same)")
    add("--sizes", default="512x512", help="comma-separated HxW timed for every model")
    add("--smallest-sizes", default="1024x2048", help="HxW timed too for the smallest variant of each family")
    add("--batches", default="1")
    add("--levels", default="all", help="'all', 'ends' (the training setting and the cheapest level) or "
        "comma-separated level names, e.g. 1111-111,2222-222")
    add("--backends", default="eager,onnxruntime,int8", help=f"of {', '.join(BACKENDS)} (compiled: torch.compile, "
        "minutes of compiling per level and shape on 2 cores, so not in the default)")
    add("--agreement-sizes", default="360x480,512x512,600x400", help="HxW of the photo-like images on which the "
        "int8 mask is compared with fp32's (through the test pipeline); empty: skip")
    add("--repeats", type=int, default=5, help="timed rounds per case at most (after one warm-up per backend)")
    add("--case-budget", type=float, default=6.0, help="seconds of timed calls per backend and case (>= 1 call)")
    add("--long-call", type=float, default=8.0, help="a first call this slow (s) is that backend's only sample")
    add("--threads", type=int, default=None, help="torch and ORT intra-op threads (default: all cores)")
    add("--matmul-n", type=int, default=2048, help="side of the square matrices of the ceiling")
    add("--onnx-dir", default=str(DEFAULT_ONNX_DIR), help="cache of exported (and quantized) graphs")
    add("--seed", type=int, default=0)
    add("--quick", action="store_true", help="smoke run: 256x256 only, batch 1, full and cheapest levels, 1 round")
    add("--json", default=None, help="write the full report here (after each model)")
    add("--resume", action="store_true", help="keep the models the `--json` file of an interrupted run has")
    add("--render", action="store_true", help="measure nothing: print and write the outputs of the `--json` report")
    add("--markdown", default=None, help="create/update this Markdown file's model-zoo table")
    add("--detail-markdown", default=None, help="create/update this Markdown file's per-level block (one model)")
    add("--plot", default=None, help="write the latency / published-mIoU Pareto plot here (PNG; needs matplotlib)")


def _apply_quick(args: argparse.Namespace) -> None:
    args.sizes, args.smallest_sizes, args.batches, args.repeats, args.matmul_n = "256x256", "", "1", 1, 1024
    args.agreement_sizes = ""  # the test pipeline resizes any image to a 512 short side: not a quick check
    if args.levels == "all" and not args.all and "," not in args.model:
        ladder = get_spec(args.model).ladder()
        args.levels = ",".join(dict.fromkeys([ladder[0].name, ladder[-1].name]))


def run_from_args(args: argparse.Namespace) -> int:
    from models.bench_report import format_list

    if args.list:
        print(format_list())
        return 0
    if args.render:
        if not args.json:
            raise SystemExit("--render needs --json (the report to render)")
        report = json.loads(Path(args.json).read_text())
        return _write_outputs(report, args)
    if args.quick:
        _apply_quick(args)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        log.warning("OMP_WAIT_POLICY is not PASSIVE: on a machine shared with other CPU work, spinning OpenMP "
                    "threads make eager timings erratic (measured 2.5 s instead of 56 ms for one EDAFormer-T call)")
    report = run_bench(args)
    if args.json:
        print(f"wrote {args.json}")
    return _write_outputs(report, args)


def _write_outputs(report: dict, args: argparse.Namespace) -> int:
    from models.bench_report import format_table, update_markdown

    print(format_table(report))
    if args.plot:
        from models.bench_plot import write_pareto_plot

        write_pareto_plot(report, Path(args.plot))
        print(f"wrote {args.plot}")
    if args.markdown:
        update_markdown(Path(args.markdown), report, "zoo", plot=Path(args.plot) if args.plot else None)
        print(f"updated {args.markdown}")
    if args.detail_markdown:
        update_markdown(Path(args.detail_markdown), report, "detail")
        print(f"updated {args.detail_markdown}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP reads it when torch loads, which `python -m models.bench` did before this line: start again with
        # it set, as `segserve` does for its own process.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "models.bench", *sys.argv[1:]])
    parser = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
