"""One load step's figures from its request results (client side) and /metrics deltas (server side), and the
verdicts against the targets of the operating-point issue.

Definitions (also written into the report):

- budget attainment is over ALL requests sent: a request meets its budget only if it was answered 200 within
  it, end to end as the client saw it, so a rejection or a timeout is a miss, never left out;
- latency percentiles are over answered requests (HTTP 200);
- achieved throughput is answered requests per second of the step's wall time (first send to last answer);
- delivered quality is the quality value of the point that answered (the receipt's `X-Segserve-Quality`; the
  plain endpoint always runs the best point), averaged over answered requests, and read relative to the best
  point's quality;
- "p99 under its budget": at least 99% of requests answered 200 within their own budget, i.e. the 99th
  percentile of latency / budget over all requests (unanswered ones counted as over) is at most 1; a server's
  "throughput with p99 under its budget" is its achieved throughput at the highest load step where that holds.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np

from loadtest.generator import CLIENT_TIMEOUT, RequestResult
from loadtest.metrics import StepServerStats

WITHIN_BUDGET_SHARE = 0.99
# The targets: attainment per offered load (fraction of capacity at the best point; steps without
# bursts), mean delivered quality at 80%, and the throughput ratio against the plain endpoint.
ATTAINMENT_TARGETS = ((0.8, 0.99), (1.0, 0.98), (1.5, 0.95))  # (up to this load, at least this attainment)
QUALITY_TARGET = (0.8, 0.9)  # at 80% load, >= 0.9 of the best point's quality
THROUGHPUT_RATIO_TARGET = 2.0


def attainment_target(fraction: float) -> float | None:
    for upto, target in ATTAINMENT_TARGETS:
        if fraction <= upto + 1e-9:
            return target
    return None


def percentiles(latencies_ms: list[float]) -> dict[str, float | None]:
    if not latencies_ms:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    values = np.asarray(latencies_ms)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
            "mean": round(float(values.mean()), 2), "max": round(float(values.max()), 2)}


def budget_ratio_p99(results: list[RequestResult]) -> float | None:
    """99th percentile of latency / budget over all requests, unanswered ones as infinitely late (None then)."""
    if not results:
        return None
    ratios = [r.latency_s * 1e3 / r.budget_ms if r.ok else math.inf for r in results]
    value = float(np.percentile(ratios, 99, method="higher"))
    return round(value, 3) if math.isfinite(value) else None


def summarize_step(
    results: list[RequestResult],
    *,
    wall_s: float,
    label: str,
    fraction: float,
    burst: bool,
    offered_rps: float,
    window_s: float,
    points: dict[str, dict[str, Any]],
    best_quality: float,
    fixed_point: str | None,
    server: StepServerStats | None,
    restarted: bool = False,
) -> dict:
    """The step's figures; `points` maps point names to their listing entry (quality, gmacs)."""
    total = len(results)
    answered = [r for r in results if r.ok]
    statuses = Counter(r.status for r in results)
    delivered = [r.point or fixed_point or "unknown" for r in answered]
    point_mix = dict(sorted(Counter(delivered).items(), key=lambda kv: -points.get(kv[0], {}).get("quality", -1)))
    if total - len(answered):
        point_mix["unserved"] = total - len(answered)  # so that the mix always sums to the request count
    qualities = [r.quality if r.quality is not None else points.get(p, {}).get("quality")
                 for r, p in zip(answered, delivered, strict=True)]
    qualities = [q for q in qualities if q is not None]
    mean_quality = float(np.mean(qualities)) if qualities else None
    gmacs = [points[p]["gmacs"] for p in delivered if p in points]
    cache_seen = [r for r in answered if r.cache is not None]
    server_flags = [r.server_budget_met for r in answered if r.server_budget_met is not None]
    attainment = round(sum(r.met_budget for r in results) / total, 4) if total else None
    ratio = budget_ratio_p99(results)
    return {
        "label": label,
        "load_fraction": fraction,
        "burst": burst,
        "offered_rps": round(offered_rps, 3),
        "sent_rps": round(total / window_s, 3) if window_s > 0 else None,
        "requests": total,
        "answered": len(answered),
        "achieved_rps": round(len(answered) / wall_s, 3) if wall_s > 0 else 0.0,
        "wall_s": round(wall_s, 2),
        "latency_ms": percentiles([r.latency_s * 1e3 for r in answered]),
        "attainment": attainment,
        "attainment_target": None if burst else attainment_target(fraction),
        "attainment_server_side": round(sum(server_flags) / len(server_flags), 4) if server_flags else None,
        "latency_over_budget_p99": ratio,
        "p99_under_budget": ratio is not None and ratio <= 1.0,
        "mean_quality": None if mean_quality is None else round(mean_quality, 3),
        "relative_quality": None if mean_quality is None or not best_quality else round(mean_quality / best_quality,
                                                                                         4),
        "mean_gmacs": round(float(np.mean(gmacs)), 3) if gmacs else None,
        "point_mix": point_mix,
        "model_mix": dict(Counter(r.model or (fixed_point or "").split("/")[0] for r in answered)),
        "scale_mix": {f"{k:g}": v for k, v in sorted(Counter(r.scale if r.scale is not None else 1.0
                                                             for r in answered).items(), reverse=True)},
        "rejections": {"429": statuses.get(429, 0), "503": statuses.get(503, 0)},
        "timeouts": {"504": statuses.get(504, 0), "client": statuses.get(CLIENT_TIMEOUT, 0)},
        "other_errors": {str(code): n for code, n in statuses.items() if code not in {200, 429, 503, 504, 0}},
        "cache_hit_rate": round(sum(r.cache == "hit" for r in cache_seen) / len(cache_seen), 4)
        if cache_seen else None,
        "repeated_share_sent": round(sum(r.repeated for r in results) / total, 4) if total else None,
        "restarted_after": restarted,
        "server": asdict(server) if server is not None else None,
    }


def latencies_ms(results: list[RequestResult]) -> list[float]:
    """Answered latencies, rounded, kept in the JSON for the CDF plot."""
    return [round(r.latency_s * 1e3, 2) for r in results if r.ok]


def _steps(targets: dict[str, dict], name: str) -> list[dict]:
    return [s for s in targets.get(name, {}).get("steps", []) if not s["burst"]]


def best_throughput(steps: list[dict]) -> dict | None:
    """The highest-load step with p99 under its budget (at least 99% answered within budget)."""
    ok = [s for s in steps if s["p99_under_budget"]]
    top = max(ok, key=lambda s: s["offered_rps"]) if ok else None
    return None if top is None else {"load_fraction": top["load_fraction"], "offered_rps": top["offered_rps"],
                                     "achieved_rps": top["achieved_rps"], "p99_ms": top["latency_ms"]["p99"]}


def verdicts(targets: dict[str, dict]) -> dict:
    """Every target of the issue, computed from the sweep (whatever the figures turn out to be)."""
    seg = _steps(targets, "segserve")
    attainment = []
    for step in seg:
        goal = step["attainment_target"]
        if goal is not None:
            attainment.append({"load_fraction": step["load_fraction"], "attainment": step["attainment"],
                               "target": goal, "met": step["attainment"] is not None and step["attainment"] >= goal})
    at80 = next((s for s in seg if abs(s["load_fraction"] - QUALITY_TARGET[0]) < 1e-9), None)
    quality = {"load_fraction": QUALITY_TARGET[0], "target": QUALITY_TARGET[1],
               "relative_quality": at80["relative_quality"] if at80 else None}
    quality["met"] = None if quality["relative_quality"] is None else quality["relative_quality"] >= QUALITY_TARGET[1]

    best = {name: best_throughput(_steps(targets, name)) for name in targets}
    mine, plain = best.get("segserve"), best.get("plain")
    throughput: dict[str, Any] = {"per_target": best, "target": THROUGHPUT_RATIO_TARGET, "ratio": None,
                                  "ratio_is_lower_bound": False}
    if "plain" not in targets:
        throughput["met"] = None  # nothing to compare with
    elif mine is None:
        throughput["met"] = False
    elif plain is not None:
        throughput["ratio"] = round(mine["achieved_rps"] / plain["achieved_rps"], 2) if plain["achieved_rps"] else None
        throughput["met"] = throughput["ratio"] is not None and throughput["ratio"] >= THROUGHPUT_RATIO_TARGET
    else:
        # The plain endpoint kept p99 under its budget at no step: its figure lies below the lowest offered rate.
        lowest = min(s["offered_rps"] for s in _steps(targets, "plain"))
        throughput["ratio"] = round(mine["achieved_rps"] / lowest, 2) if lowest else None
        throughput["ratio_is_lower_bound"] = True
        throughput["met"] = throughput["ratio"] is not None and throughput["ratio"] >= THROUGHPUT_RATIO_TARGET
        throughput["note"] = (f"the plain endpoint had p99 over its budget at every step, the lowest offering "
                              f"{lowest:.2f} req/s: the ratio is a lower bound")
    met = [v["met"] for v in attainment] + [quality["met"], throughput["met"]]
    return {"attainment": attainment, "quality_at_80": quality, "throughput_p99_under_budget": throughput,
            "all_met": None if None in met or not attainment else all(met)}
