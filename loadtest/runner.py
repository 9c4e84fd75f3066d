"""The whole measurement: start each server in turn, measure segserve's capacity, sweep the load.

Order: segserve (its /v1/models gives the ladder, the best point and the budget range; a closed-loop probe at
the best point measures capacity), then baseline (b) a fresh segserve where every request names the best point
(the planner bypassed; batching and cache on), then baseline (a) the plain endpoint running the default model
at full compute. Every target gets the same requests (same seed: same images, budgets and send times) at the
same offered rates, derived from segserve's capacity at the best point.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loadtest import generator, metrics, servers, stats
from loadtest.configs import ModelsConfig
from loadtest.scenarios import LoadStep, RequestFactory, Scenario
from segserve_client import Listing, PointInfo

log = logging.getLogger("loadtest")

TARGETS = ("segserve", "segserve-fixed", "plain")


@dataclass
class RunConfig:
    models: ModelsConfig
    out_dir: Path
    serving: servers.ServingConfig = field(default_factory=servers.ServingConfig)
    scenario: Scenario = field(default_factory=Scenario)
    budget_factors: tuple[float, float] = (1.0, 4.0)  # x the best point's batch-1 latency
    steps: list[LoadStep] = field(default_factory=lambda: LoadStep.parse_list("0.25,0.5,0.8,1,1.5,0.8b"))
    duration_s: float = 20.0
    max_requests: int = 2000  # per step, whatever the rate
    client_timeout_s: float = 5.0
    capacity_s: float = 8.0
    capacity_rps: float | None = None  # given: the rates derive from it (the probe runs only with `probe`)
    probe: bool = True
    drain_timeout_s: float = 15.0
    targets: tuple[str, ...] = TARGETS


async def measure_capacity(server: servers.ManagedServer, config: RunConfig, point: str) -> dict:
    """Closed loop at the best point, enough users to keep every batch full; fresh images only."""
    concurrency = 2 * config.serving.workers * config.serving.max_batch_size
    factory = RequestFactory(Scenario(**{**asdict(config.scenario), "seed": config.scenario.seed + 9973}))
    params = generator.fixed_point_params(point)
    # A short warm-up first: the first batches at a new shape pay allocation costs.
    await generator.run_closed_loop(server.base_url, factory, concurrency=concurrency,
                                    duration_s=min(2.0, config.capacity_s / 4), params=params)
    await asyncio.to_thread(server.wait_idle, config.drain_timeout_s)
    results, wall_s = await generator.run_closed_loop(server.base_url, factory, concurrency=concurrency,
                                                      duration_s=config.capacity_s, params=params)
    answered = sum(r.ok for r in results)
    await asyncio.to_thread(server.wait_idle, config.drain_timeout_s)
    return {"method": f"closed loop, {concurrency} users, point {point}, {config.capacity_s:g} s",
            "measured_rps": round(answered / wall_s, 3), "probe_requests": len(results), "probe_answered": answered}


def calibrated_capacity(best: PointInfo, workers: int, max_batch: int) -> float | None:
    """workers * batch / latency(best point, batch) at the largest calibrated batch size."""
    usable = [b for b in best.latency_ms if b <= max_batch]
    if not usable:
        return None
    batch = max(usable)
    return round(workers * batch / (best.latency_ms[batch] / 1e3), 3)


async def warm_up(server: servers.ManagedServer, config: RunConfig) -> None:
    """One request per image size, one at a time, so first-use costs of each input shape fall outside steps."""
    factory = RequestFactory(Scenario(**{**asdict(config.scenario), "seed": config.scenario.seed + 7919}))
    for size in config.scenario.sizes:
        spec = next(spec for spec in iter(factory.fresh, None) if spec.size == size)
        await generator.run_open_loop(server.base_url, [spec], params=lambda _: {}, timeout_s=60.0)


async def run_step(server: servers.ManagedServer, factory: RequestFactory, step: LoadStep, rate: float,
                   config: RunConfig, ladder: dict) -> tuple[dict, list[generator.RequestResult]]:
    specs = factory.step(rate, config.duration_s, step.burst, config.max_requests)
    is_segserve = server.kind == "segserve"
    before = metrics.parse(await generator.get_text(server.base_url, "/metrics")) if is_segserve else None
    log.info("%s: step %s, %.2f req/s offered, %d requests", server.name, step.label, rate, len(specs))
    params = generator.fixed_point_params(server.fixed_point) if is_segserve and server.fixed_point else \
        generator.budget_params
    results, wall_s = await generator.run_open_loop(server.base_url, specs, params=params,
                                                    timeout_s=config.client_timeout_s)
    # The sending window: the whole step, or up to the last send when the request bound cut the step short.
    window_s = specs[-1].at_s if specs and len(specs) >= config.max_requests else config.duration_s
    idle = await asyncio.to_thread(server.wait_idle, config.drain_timeout_s)
    server_stats = None
    if before is not None:
        server_stats = metrics.delta(before, metrics.parse(await generator.get_text(server.base_url, "/metrics")))
    if not idle:
        # Work abandoned by timed-out clients would otherwise run into the next step.
        log.warning("%s did not go idle within %.0f s after step %s; restarting it", server.name,
                    config.drain_timeout_s, step.label)
        await asyncio.to_thread(server.restart)
    summary = stats.summarize_step(
        results, wall_s=wall_s, label=step.label, fraction=step.fraction, burst=step.burst, offered_rps=rate,
        window_s=window_s, points=ladder["points"], best_quality=ladder["best"]["quality"],
        fixed_point=server.fixed_point, server=server_stats, restarted=not idle)
    # The machine's 1-minute load average (this run's own server and client included, ~2 on 2 cores at full
    # load): figures taken while other work shared the cores are marked by it, not silently mixed in.
    summary["loadavg_1m"] = round(os.getloadavg()[0], 2)
    log.info("%s: %s achieved %.2f req/s, p99 %s ms, attainment %s, relative quality %s", server.name, step.label,
             summary["achieved_rps"], summary["latency_ms"]["p99"], summary["attainment"],
             summary["relative_quality"])
    return summary, results


def source_version() -> str:
    """`git describe --always --dirty` of the code under test ("unknown" outside a git checkout)."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=servers.ROOT, capture_output=True,
                              text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def ladder_table(listing: Listing) -> dict:
    """The listing as the report keeps it: every point of the default task's pool, its ladder, the best point."""
    pool = [m for m in listing.models if m.task == listing.default_task]
    points = {p.name: {"model": p.model, "level": p.level, "scale": p.scale, "gmacs": p.gmacs,
                       "quality": p.quality, "quality_source": p.quality_source, "on_ladder": p.on_ladder,
                       "latency_ms": {str(b): ms for b, ms in sorted(p.latency_ms.items())}}
              for m in pool for p in m.points}
    best = listing.best_point()
    return {"default_model": listing.default_model, "task": listing.default_task,
            "models": [m.name for m in pool], "ladder": listing.tasks[listing.default_task],
            "points": points, "best": {"name": best.name, "quality": best.quality,
                                       "batch1_ms": best.latency_ms.get(1)},
            "calibration_shape": list(listing.model().calibration_shape)}


async def _first_target(server: servers.ManagedServer, config: RunConfig, report: dict) -> tuple[dict, dict]:
    """segserve: the ladder, the budget range and the capacity that every target's rates derive from."""
    listing = await generator.get_listing(server.base_url)
    ladder = ladder_table(listing)
    best = listing.best_point()
    if 1 not in best.latency_ms:
        raise RuntimeError(f"/v1/models reports no batch-1 latency for the best point {best.name}")
    low, high = (factor * best.latency_ms[1] for factor in config.budget_factors)
    config.scenario = replace(config.scenario, budget_low_ms=low, budget_high_ms=high)
    capacity = {"best_point": best.name, "best_batch1_ms": best.latency_ms[1],
                "calibrated_rps": calibrated_capacity(best, config.serving.workers, config.serving.max_batch_size)}
    if config.capacity_rps is None or config.probe:
        capacity.update(await measure_capacity(server, config, best.name))
    if config.capacity_rps is None:
        capacity["used_rps"] = capacity["measured_rps"]
    else:
        capacity.update(used_rps=config.capacity_rps, used_from="given on the command line")
    if not capacity["used_rps"]:
        raise RuntimeError(f"segserve answered nothing in the capacity probe:\n{server.log_tail()}")
    report.update(capacity=capacity, ladder=ladder, scenario=config.scenario.describe(),
                  budget_factors=list(config.budget_factors))
    log.info("best point %s (batch 1: %.1f ms); capacity %.2f req/s (calibrated estimate %s); budgets %.0f..%.0f ms",
             best.name, best.latency_ms[1], capacity["used_rps"], capacity["calibrated_rps"], low, high)
    return ladder, {step: step.fraction * capacity["used_rps"] for step in config.steps}


def build_server(name: str, config: RunConfig, best_point: str | None) -> servers.ManagedServer:
    if name == "segserve":
        return servers.segserve(name, config.serving)
    if best_point is None:
        raise RuntimeError("the baselines run at segserve's best point: measure segserve first")
    if name == "segserve-fixed":
        server = servers.segserve(name, config.serving)
        server.fixed_point = best_point
        return server
    if name == "plain":
        return servers.plain(name, config.serving, best_point)
    raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")


async def run(config: RunConfig) -> dict:
    """Measure every target; returns the report dict (see loadtest.report for its files)."""
    started = time.time()
    if "segserve" not in config.targets:
        raise ValueError("the sweep is defined relative to segserve's capacity: include the segserve target")
    profiles = config.out_dir.resolve() / "profiles"
    shutil.rmtree(profiles, ignore_errors=True)  # calibrated afresh by this run, never an earlier run's profile
    config.serving = replace(config.serving, config_path=str(config.models.write(config.out_dir)),
                             model=config.models.default_model, checkpoint=config.models.default_checkpoint,
                             profile_dir=str(profiles))
    report: dict = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                    "code": source_version(),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "processor": platform.processor() or platform.machine(),
                                "python": platform.python_version()},
                    "configuration": {"name": config.models.name, "source": config.models.source,
                                      "models_toml": config.models.toml},
                    "serving": asdict(config.serving), "targets": {}, "latencies_ms": {}, "requests": []}
    ordered = [name for name in TARGETS if name in config.targets]
    ladder: dict = {}
    rates: dict[LoadStep, float] = {}
    for name in ordered:
        server = build_server(name, config, ladder.get("best", {}).get("name"))
        log.info("starting %s", name)
        await asyncio.to_thread(server.start)
        try:
            await warm_up(server, config)
            if name == "segserve":
                ladder, rates = await _first_target(server, config, report)
            factory = RequestFactory(config.scenario)  # same seed per target: the same requests for everyone
            steps, latencies = [], {}
            for step in config.steps:
                summary, results = await run_step(server, factory, step, rates[step], config, ladder)
                steps.append(summary)
                latencies[step.label] = stats.latencies_ms(results)
                report["requests"] += [{"target": name, "step": step.label, **asdict(r)} for r in results]
            report["targets"][name] = {"kind": server.kind, "fixed_point": server.fixed_point, "steps": steps}
            report["latencies_ms"][name] = latencies
        finally:
            server.stop()  # blocking on purpose: it must run even while the loop is being torn down
    report["verdicts"] = stats.verdicts(report["targets"])
    report["config"] = {"duration_s": config.duration_s, "max_requests": config.max_requests,
                        "client_timeout_s": config.client_timeout_s, "steps": [s.label for s in config.steps],
                        "targets": ordered}
    report["elapsed_s"] = round(time.time() - started, 1)
    return report
