"""`segserve loadtest run ...` (or `python -m loadtest run ...`): the whole load-test report from one command.

    segserve loadtest run                               # EDAFormer-T alone, full sweep, three targets
    segserve loadtest run --config ade20k-pool          # EDAFormer-T + SegFormer-B0 + SeaFormer-T, one pool
    segserve loadtest run --quick                       # a short run to check the set-up
    segserve loadtest render loadtest-results           # summary and plots again from report.json

Needs the `loadtest` extra: pip install -c constraints/cpu.txt '.[loadtest]'. See docs/loadtest.md.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Only the standard library above this line: `segserve --help` builds this parser, and must work (and say what
# to install) without the extra.
if TYPE_CHECKING:
    from loadtest.runner import RunConfig

DEFAULT_LOADS = "0.25,0.5,0.8,1,1.5,0.8b"
QUICK = {"duration": 5.0, "loads": "0.5,0.8,1.5", "capacity_seconds": 4.0, "max_requests": 300}
EXTRA_MODULES = ("matplotlib", "httpx")
INSTALL_HINT = ("pip install -c constraints/cpu.txt '.[loadtest]'  (from a checkout; or "
                "pip install 'segserve[loadtest]')")


def missing_extra() -> list[str]:
    """Modules of the `loadtest` extra that cannot be imported (not installed, or broken)."""
    missing = []
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_extra(prog: str) -> None:
    missing = missing_extra()
    if missing:
        print(f"{prog}: the load test needs the 'loadtest' extra ({', '.join(missing)} missing):\n"
              f"    {INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2)


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW,HIGH") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW,HIGH with 0 < LOW <= HIGH")
    return low, high


def _burst(text: str) -> tuple[float, float, float]:
    try:
        every, length, factor = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected EVERY_S,LENGTH_S,FACTOR") from None
    return every, length, factor


def _add_run_options(run: argparse.ArgumentParser) -> None:
    what = run.add_argument_group("what is served")
    what.add_argument("--config", help="a preset (edaformer-t: EDAFormer-T alone, the default; ade20k-pool: "
                      "EDAFormer-T + SegFormer-B0 + SeaFormer-T) or a model repository file (TOML/YAML)")
    what.add_argument("--model", dest="models", action="append", metavar="NAME[:CHECKPOINT]",
                      help="serve these models as one pool instead (repeatable; the first is the default model)")
    what.add_argument("--checkpoint", help="weights of the default model (default: random weights)")
    what.add_argument("--scales", default="1,0.75,0.5", help="input scales of presets and --model (default 1,0.75,0.5)")
    run.add_argument("--quick", action="store_true", help="short steps and three loads (a set-up check)")
    run.add_argument("--out", type=Path, default=Path("loadtest-results"), help="output directory")
    run.add_argument("--targets", default="segserve,segserve-fixed,plain",
                     help="comma-separated subset of segserve, segserve-fixed, plain")
    run.add_argument("--duration", type=float, help="seconds per load step (default 20)")
    run.add_argument("--loads", help="load steps as fractions of the capacity at the best point; a trailing 'b' = "
                     f"with bursts (default {DEFAULT_LOADS})")
    run.add_argument("--max-requests", type=int, help="bound on requests per step (default 2000)")
    run.add_argument("--sizes", help="image sizes HxW[:weight],... (default 256x341:0.4,480x640:0.2,240x320:0.2,"
                     "341x256:0.2)")
    run.add_argument("--repeat-share", type=float, default=0.2, help="share of requests re-sending a hot image")
    run.add_argument("--hot-set", type=int, default=16, help="distinct images behind the repeated share")
    run.add_argument("--budget-range", type=_pair, default=(1.0, 4.0),
                     help="LOW,HIGH budgets as multiples of the best point's batch-1 latency (default 1,4)")
    run.add_argument("--burst", type=_burst, help="EVERY_S,LENGTH_S,FACTOR of burst steps (default 10,1,3; the "
                     "period shrinks to the step duration when that is shorter, so that a short step has a burst too)")
    run.add_argument("--client-timeout", type=float, default=5.0, help="client timeout per request, s")
    run.add_argument("--capacity-seconds", type=float, help="length of the capacity probe (default 8)")
    run.add_argument("--capacity-rps", type=float, help="derive the rates from this capacity (req/s) instead of "
                     "the probe's, which is then skipped unless --probe")
    run.add_argument("--probe", action="store_true", help="with --capacity-rps: run the probe anyway and report it")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--resize-scale", default="1024x256", help="serving scale LONGxSHORT (SEGSERVE_RESIZE_SCALE)")
    run.add_argument("--calibration-shape", default="256x352", help="HxW (SEGSERVE_CALIBRATION_SHAPE)")
    run.add_argument("--max-batch-size", type=int, default=4)
    run.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    run.add_argument("--max-queue-size", type=int, default=64)
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--calibration-repeats", type=int, default=3, help="timed runs per anchor and batch size")
    run.add_argument("--threads", type=int, help="intra-op threads per worker and for the plain endpoint "
                     "(default: all cores)")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="extra environment for every server (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every server runs the model")
    run.add_argument("--no-plots", action="store_true")
    run.set_defaults(handler=_run)


def build_config(args: argparse.Namespace) -> RunConfig:
    from dataclasses import replace

    from loadtest.configs import resolve
    from loadtest.runner import TARGETS, RunConfig
    from loadtest.scenarios import LoadStep, Scenario, parse_sizes
    from loadtest.servers import ServingConfig

    quick = QUICK if args.quick else {}
    duration = args.duration if args.duration is not None else quick.get("duration", 20.0)
    period = min(10.0, duration)
    every, length, factor = args.burst or (period, min(1.0, period / 4), 3.0)
    scenario = Scenario(repeat_share=args.repeat_share, hot_set=args.hot_set, seed=args.seed,
                        burst_every_s=every, burst_length_s=length, burst_factor=factor)
    if args.sizes:
        scenario = replace(scenario, sizes=parse_sizes(args.sizes))
    scales = tuple(float(s) for s in args.scales.split(",") if s.strip())
    try:
        models = resolve(args.config, args.models, args.checkpoint, scales)
    except ValueError as exc:
        raise SystemExit(f"segserve loadtest: {exc}") from None
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"segserve loadtest: --env {item!r}: expected NAME=VALUE")
        env[name] = value
    serving = ServingConfig(resize_scale=args.resize_scale, calibration_shape=args.calibration_shape,
                            max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                            max_queue_size=args.max_queue_size, workers=args.workers, device=args.device,
                            calibration_repeats=args.calibration_repeats, threads=args.threads, extra_env=env)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")

    def pick(name: str, default: object) -> object:
        given = getattr(args, name)
        return given if given is not None else quick.get(name, default)

    return RunConfig(
        models=models, out_dir=args.out, serving=serving, scenario=scenario, budget_factors=args.budget_range,
        steps=LoadStep.parse_list(pick("loads", DEFAULT_LOADS)), duration_s=duration,
        max_requests=pick("max_requests", 2000), client_timeout_s=args.client_timeout,
        capacity_s=pick("capacity_seconds", 8.0), capacity_rps=args.capacity_rps,
        probe=args.probe or args.capacity_rps is None, targets=targets,
    )


def _run(args: argparse.Namespace) -> int:
    require_extra("segserve loadtest")
    # Imported here so that `segserve --help` does not pay for matplotlib and the runner.
    import asyncio
    import logging
    import signal

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
    require_extra("segserve loadtest")
    import json

    from loadtest import report

    data = json.loads((args.dir / "report.json").read_text())
    written = report.write(data, args.dir, plots=True)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _add_commands(commands: argparse._SubParsersAction) -> None:
    _add_run_options(commands.add_parser("run", help="measure capacity, sweep the load, write the report",
                                         description=__doc__.split("\n")[0]))
    render = commands.add_parser("render", help="rewrite summary.md and the plots from DIR/report.json")
    render.add_argument("dir", type=Path, nargs="?", default=Path("loadtest-results"))
    render.set_defaults(handler=_render)


def add_loadtest_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """`segserve loadtest run ...` (called by service.cli)."""
    parser = subparsers.add_parser(
        "loadtest", help="open-loop load test against segserve and baselines (extra 'loadtest')",
        description=__doc__.split("\n")[0], epilog=f"Needs the 'loadtest' extra: {INSTALL_HINT}.")
    _add_commands(parser.add_subparsers(dest="loadtest_command", required=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0],
                                     epilog=f"Needs the 'loadtest' extra: {INSTALL_HINT}.")
    _add_commands(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    return int(args.handler(args) or 0)
