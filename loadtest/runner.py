"""The whole measurement: start each server in turn, measure segserve's capacity, sweep the load.

Order: segserve (its /v1/models gives the budget range and the calibrated capacity, then a closed-loop
probe measures capacity), then baseline (b) segserve with only the full level, then baseline (a) the
plain endpoint. Every target gets the same requests (same seed: same images, budgets and send times)
at the same offered rates, derived from segserve's capacity.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field

from loadtest import generator, metrics, servers, stats
from loadtest.scenarios import LoadStep, RequestFactory, Scenario

log = logging.getLogger("loadtest")

TARGETS = ("segserve", "segserve-fixed", "plain")


@dataclass
class RunConfig:
    serving: servers.ServingConfig = field(default_factory=servers.ServingConfig)
    scenario: Scenario = field(default_factory=Scenario)
    budget_factors: tuple[float, float] = (2.0, 6.0)  # x the cheapest level's batch-1 latency
    steps: list[LoadStep] = field(default_factory=lambda: LoadStep.parse_list("0.25,0.5,0.8,1,1.5,0.8b"))
    duration_s: float = 20.0
    max_requests: int = 2000  # per step, whatever the rate
    client_timeout_s: float = 5.0
    capacity_s: float = 8.0
    capacity_rps: float | None = None  # given: skip the probe
    drain_timeout_s: float = 15.0
    targets: tuple[str, ...] = TARGETS


def cheapest_level(levels: list[dict]) -> dict:
    return max(levels, key=lambda level: level["rank"])


def calibrated_capacity(levels: list[dict], workers: int, max_batch: int) -> float | None:
    """workers * batch / latency(cheapest, batch) at the largest calibrated batch size."""
    table = {int(b): ms for b, ms in cheapest_level(levels)["latency_ms"].items()}
    usable = [b for b in table if b <= max_batch]
    if not usable:
        return None
    batch = max(usable)
    return workers * batch / (table[batch] / 1e3)


async def measure_capacity(server: servers.ManagedServer, config: RunConfig, level: str) -> dict:
    """Closed loop at the cheapest level, enough users to keep every batch full; fresh images only."""
    concurrency = 2 * config.serving.workers * config.serving.max_batch_size
    factory = RequestFactory(Scenario(**{**asdict(config.scenario), "seed": config.scenario.seed + 9973}))

    def params(spec: object) -> dict[str, str]:
        return {"level": level}

    # A short warm-up first: the first batches at a new shape pay allocation costs.
    await generator.run_closed_loop(server.base_url, factory, concurrency=concurrency,
                                    duration_s=min(2.0, config.capacity_s / 4), params=params)
    server.wait_idle(config.drain_timeout_s)
    results, wall_s = await generator.run_closed_loop(server.base_url, factory, concurrency=concurrency,
                                                      duration_s=config.capacity_s, params=params)
    answered = sum(r.ok for r in results)
    server.wait_idle(config.drain_timeout_s)
    return {"method": f"closed loop, {concurrency} users, level {level}, {config.capacity_s:g} s",
            "measured_rps": round(answered / wall_s, 3), "requests": len(results), "answered": answered}


async def warm_up(server: servers.ManagedServer, config: RunConfig) -> None:
    """One request per image size, one at a time, so first-use costs of each input shape fall outside steps."""
    factory = RequestFactory(Scenario(**{**asdict(config.scenario), "seed": config.scenario.seed + 7919}))
    for size in config.scenario.sizes:
        spec = next(spec for spec in iter(factory.fresh, None) if spec.size == size)
        await generator.run_open_loop(server.base_url, [spec], params=lambda _: {}, timeout_s=60.0)


async def run_step(server: servers.ManagedServer, factory: RequestFactory, step: LoadStep, rate: float,
                   config: RunConfig, models: dict) -> tuple[dict, list[generator.RequestResult]]:
    specs = factory.step(rate, config.duration_s, step.burst, config.max_requests)
    before = metrics.parse(await generator.get_text(server.base_url, "/metrics")) if server.kind == "segserve" else None
    log.info("%s: step %s, %.2f req/s offered, %d requests", server.name, step.label, rate, len(specs))
    results, wall_s = await generator.run_open_loop(server.base_url, specs, timeout_s=config.client_timeout_s)
    # The sending window: the whole step, or up to the last send when the request bound cut the step short.
    window_s = specs[-1].at_s if specs and len(specs) >= config.max_requests else config.duration_s
    idle = await asyncio.to_thread(server.wait_idle, config.drain_timeout_s)
    server_stats = None
    if before is not None:
        after = metrics.parse(await generator.get_text(server.base_url, "/metrics"))
        server_stats = metrics.delta(before, after)
    if not idle:
        # Work abandoned by timed-out clients would otherwise run into the next step.
        log.warning("%s did not go idle within %.0f s after step %s; restarting it", server.name,
                    config.drain_timeout_s, step.label)
        await asyncio.to_thread(server.restart)
    summary = stats.summarize_step(
        results, wall_s=wall_s, label=step.label, fraction=step.fraction, burst=step.burst, offered_rps=rate,
        window_s=window_s, gmacs_by_level=models["gmacs"], level_ranks=models["ranks"],
        fixed_level=server.fixed_level, server=server_stats, restarted=not idle)
    # The machine's 1-minute load average (this run's own server and client included, ~2 on 2 cores at full
    # load): figures taken while other work shared the cores are marked by it, not silently mixed in.
    summary["loadavg_1m"] = round(os.getloadavg()[0], 2)
    log.info("%s: %s achieved %.2f req/s, p99 %s ms, attainment %s, mean %s GMACs", server.name, step.label,
             summary["achieved_rps"], summary["latency_ms"]["p99"], summary["attainment"], summary["mean_gmacs"])
    return summary, results


def source_version() -> str:
    """`git describe --always --dirty` of the code under test ("unknown" outside a git checkout)."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=servers.ROOT, capture_output=True,
                              text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def build_server(name: str, config: RunConfig) -> servers.ManagedServer:
    if name == "segserve":
        return servers.segserve(name, config.serving)
    if name == "segserve-fixed":
        return servers.segserve(name, config.serving, levels=servers.FULL_LEVEL)
    if name == "plain":
        return servers.plain(name, config.serving)
    raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")


def models_table(models_json: dict) -> dict:
    levels = models_json["models"][0]["levels"]
    return {"levels": levels, "gmacs": {lv["name"]: lv["gmacs"] for lv in levels},
            "ranks": {lv["name"]: lv["rank"] for lv in levels},
            "calibration_shape": models_json["models"][0]["calibration_shape"]}


async def run(config: RunConfig) -> dict:
    """Measure every target; returns the report dict (see loadtest.report for its files)."""
    started = time.time()
    if "segserve" not in config.targets:
        raise ValueError("the sweep is defined relative to segserve's capacity: include the segserve target")
    report: dict = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                    "code": source_version(),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "processor": platform.processor() or platform.machine(),
                                "python": platform.python_version()},
                    "serving": asdict(config.serving), "targets": {}, "latencies_ms": {},
                    "requests": []}
    ordered = [name for name in TARGETS if name in config.targets]
    models: dict = {}
    rates: dict[LoadStep, float] = {}
    for name in ordered:
        server = build_server(name, config)
        log.info("starting %s", name)
        await asyncio.to_thread(server.start)
        try:
            await warm_up(server, config)
            if name == "segserve":
                models = models_table(await generator.get_json(server.base_url, "/v1/models"))
                cheapest = cheapest_level(models["levels"])
                batch1_ms = float(cheapest["latency_ms"]["1"])
                low, high = (factor * batch1_ms for factor in config.budget_factors)
                config.scenario = Scenario(**{**asdict(config.scenario), "budget_low_ms": low, "budget_high_ms": high})
                capacity = {"cheapest_level": cheapest["name"], "cheapest_batch1_ms": batch1_ms,
                            "calibrated_rps": calibrated_capacity(models["levels"], config.serving.workers,
                                                                  config.serving.max_batch_size)}
                if config.capacity_rps is None:
                    capacity.update(await measure_capacity(server, config, cheapest["name"]))
                    capacity["used_rps"] = capacity["measured_rps"]
                else:
                    capacity.update(method="given on the command line", used_rps=config.capacity_rps)
                if not capacity["used_rps"]:
                    raise RuntimeError(f"segserve answered nothing in the capacity probe:\n{server.log_tail()}")
                report["capacity"] = capacity
                report["models"] = {"levels": models["levels"], "calibration_shape": models["calibration_shape"]}
                report["scenario"] = config.scenario.describe()
                report["budget_factors"] = list(config.budget_factors)
                rates = {step: step.fraction * capacity["used_rps"] for step in config.steps}
                log.info("capacity %.2f req/s (calibrated estimate %s); budgets %.0f..%.0f ms",
                         capacity["used_rps"], capacity["calibrated_rps"], low, high)
            factory = RequestFactory(config.scenario)  # same seed per target: the same requests for everyone
            steps, latencies = [], {}
            for step in config.steps:
                summary, results = await run_step(server, factory, step, rates[step], config, models)
                steps.append(summary)
                latencies[step.label] = stats.latencies_ms(results)
                report["requests"] += [{"target": name, "step": step.label, **asdict(r)} for r in results]
            report["targets"][name] = {"kind": server.kind, "fixed_level": server.fixed_level, "steps": steps}
            report["latencies_ms"][name] = latencies
        finally:
            server.stop()  # blocking on purpose: it must run even while the loop is being torn down
    report["verdicts"] = stats.verdicts(report["targets"])
    report["config"] = {"duration_s": config.duration_s, "max_requests": config.max_requests,
                        "client_timeout_s": config.client_timeout_s, "steps": [s.label for s in config.steps],
                        "targets": ordered}
    report["elapsed_s"] = round(time.time() - started, 1)
    return report
