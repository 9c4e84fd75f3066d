"""`python -m loadtest run ...` and `segserve loadtest run ...`: the whole report from one command.

    python -m loadtest run                  # full sweep, three targets, ~10-15 min on 2 cores
    python -m loadtest run --quick          # a short run to check the set-up (~2 min)
    python -m loadtest run --targets segserve --loads 0.5,1 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loadtest.scenarios import LoadStep, Scenario, parse_sizes
from loadtest.servers import ServingConfig

if TYPE_CHECKING:
    from loadtest.runner import RunConfig

DEFAULT_LOADS = "0.25,0.5,0.8,1,1.5,0.8b"
QUICK = {"duration": 5.0, "loads": "0.25,0.8,1.5", "capacity_seconds": 4.0, "max_requests": 300}


def _pair(text: str) -> tuple[float, float]:
    low, high = (float(v) for v in text.split(","))
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW,HIGH with 0 < LOW <= HIGH")
    return low, high


def _add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--quick", action="store_true", help="short steps and three loads (a set-up check)")
    run.add_argument("--out", type=Path, default=Path("loadtest-results"), help="output directory")
    run.add_argument("--targets", default="segserve,segserve-fixed,plain",
                     help="comma-separated subset of segserve, segserve-fixed, plain")
    run.add_argument("--duration", type=float, help="seconds per load step (default 20)")
    run.add_argument("--loads", help="load steps as fractions of capacity; a trailing 'b' = with bursts "
                     f"(default {DEFAULT_LOADS})")
    run.add_argument("--max-requests", type=int, help="bound on requests per step (default 2000)")
    run.add_argument("--sizes", type=parse_sizes, help="image sizes HxW[:weight],... (default "
                     "256x341:0.4,480x640:0.2,240x320:0.2,341x256:0.2)")
    run.add_argument("--repeat-share", type=float, default=0.2, help="share of requests re-sending a hot image")
    run.add_argument("--hot-set", type=int, default=16, help="distinct images behind the repeated share")
    run.add_argument("--budget-range", type=_pair, default=(2.0, 6.0),
                     help="LOW,HIGH budgets as multiples of the cheapest level's batch-1 latency (default 2,6)")
    run.add_argument("--burst", type=lambda t: tuple(float(v) for v in t.split(",")),
                     help="EVERY_S,LENGTH_S,FACTOR of burst steps (default 10,1,3; the period shrinks to the step "
                     "duration when that is shorter, so that a short step has a burst too)")
    run.add_argument("--client-timeout", type=float, default=5.0, help="client timeout per request, s")
    run.add_argument("--capacity-seconds", type=float, help="length of the capacity probe (default 8)")
    run.add_argument("--capacity-rps", type=float, help="skip the probe and use this capacity (req/s)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--resize-scale", default="1024x256", help="serving scale LONGxSHORT (SEGSERVE_RESIZE_SCALE)")
    run.add_argument("--calibration-shape", default="256x352", help="HxW (SEGSERVE_CALIBRATION_SHAPE)")
    run.add_argument("--max-batch-size", type=int, default=4)
    run.add_argument("--max-queue-delay-ms", type=float, default=10.0)
    run.add_argument("--max-queue-size", type=int, default=64)
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--calibration-repeats", type=int, default=3, help="timed runs per level and batch size")
    run.add_argument("--threads", type=int, help="intra-op threads per worker and for the plain endpoint "
                     "(default: all cores)")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="extra environment for every server (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE")
    run.add_argument("--model", default="edaformer-t")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every server runs the model")
    run.add_argument("--checkpoint", help="weights for every server (default: random weights)")
    run.add_argument("--no-plots", action="store_true")
    run.set_defaults(handler=_run)


def build_config(args: argparse.Namespace) -> RunConfig:
    from loadtest.runner import TARGETS, RunConfig

    quick = QUICK if args.quick else {}
    duration = args.duration if args.duration is not None else quick.get("duration", 20.0)
    period = min(10.0, duration)
    every, length, factor = args.burst or (period, min(1.0, period / 4), 3.0)
    scenario = Scenario(repeat_share=args.repeat_share, hot_set=args.hot_set, seed=args.seed,
                        burst_every_s=every, burst_length_s=length, burst_factor=factor)
    if args.sizes:
        scenario = replace(scenario, sizes=args.sizes)
    serving = ServingConfig(resize_scale=args.resize_scale, calibration_shape=args.calibration_shape,
                            max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                            max_queue_size=args.max_queue_size, workers=args.workers, model=args.model,
                            device=args.device, checkpoint=args.checkpoint,
                            calibration_repeats=args.calibration_repeats, threads=args.threads,
                            extra_env=dict(item.split("=", 1) for item in args.env))
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")

    def pick(name: str, default: object) -> object:
        given = getattr(args, name)
        return given if given is not None else quick.get(name, default)

    return RunConfig(
        serving=serving, scenario=scenario, budget_factors=args.budget_range,
        steps=LoadStep.parse_list(pick("loads", DEFAULT_LOADS)), duration_s=duration,
        max_requests=pick("max_requests", 2000), client_timeout_s=args.client_timeout,
        capacity_s=pick("capacity_seconds", 8.0), capacity_rps=args.capacity_rps, targets=targets,
    )


def _run(args: argparse.Namespace) -> int:
    # Imported here so that `segserve --help` does not pay for matplotlib and the runner.
    from loadtest import report, runner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress
    # SIGTERM (e.g. `timeout`) becomes an exit, so the servers started here are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    config = build_config(args)
    result = asyncio.run(runner.run(config))
    argv = getattr(args, "argv", None)  # set by main(); `segserve loadtest run` comes through service.cli
    result["command"] = ("python -m loadtest run " + shlex.join(argv)) if argv is not None else \
        shlex.join(["segserve", *sys.argv[1:]])
    written = report.write(result, args.out, plots=not args.no_plots)
    print(report.markdown(result))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _render(args: argparse.Namespace) -> int:
    """Summary and plots again from a finished run's report.json (e.g. after changing the plots)."""
    import json

    from loadtest import report

    data = json.loads((args.dir / "report.json").read_text())
    written = report.write(data, args.dir, plots=True)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _add_commands(commands: argparse._SubParsersAction) -> None:
    _add_run_options(commands.add_parser("run", help="measure capacity, sweep the load, write the report"))
    render = commands.add_parser("render", help="rewrite summary.md and the plots from DIR/report.json")
    render.add_argument("dir", type=Path, nargs="?", default=Path("loadtest-results"))
    render.set_defaults(handler=_render)


def add_loadtest_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """`segserve loadtest run ...` (called by service.cli)."""
    parser = subparsers.add_parser("loadtest", help="open-loop load test against segserve and baselines",
                                   description=__doc__.split("\n")[0])
    _add_commands(parser.add_subparsers(dest="loadtest_command", required=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    _add_commands(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    return int(args.handler(args) or 0)
