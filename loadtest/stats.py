"""One load step's figures from its request results (client side) and /metrics deltas (server side).

Definitions (also written into the report):

- latency percentiles are over answered requests (HTTP 200), end to end as the client saw them;
- attainment is over ALL requests: a request meets its budget only if it was answered 200 within it,
  so a rejection or a timeout is a miss, never left out;
- achieved throughput is answered requests per second of the step's wall time (first send to last
  answer);
- "p99 under 1 s" holds when the p99 of answered requests is under 1 s and at least 99% of requests
  were answered, so a server cannot qualify by refusing its slow requests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

import numpy as np

from loadtest.generator import CLIENT_TIMEOUT, RequestResult
from loadtest.metrics import StepServerStats

P99_LIMIT_MS = 1000.0
MIN_ANSWERED_SHARE = 0.99


def percentiles(latencies_ms: list[float]) -> dict[str, float | None]:
    if not latencies_ms:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    values = np.asarray(latencies_ms)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
            "mean": round(float(values.mean()), 2), "max": round(float(values.max()), 2)}


def summarize_step(
    results: list[RequestResult],
    *,
    wall_s: float,
    label: str,
    fraction: float,
    burst: bool,
    offered_rps: float,
    window_s: float,
    gmacs_by_level: dict[str, float],
    level_ranks: dict[str, int],
    fixed_level: str | None,
    server: StepServerStats | None,
    restarted: bool = False,
) -> dict:
    total = len(results)
    answered = [r for r in results if r.ok]
    statuses = Counter(r.status for r in results)
    levels = [r.level or fixed_level or "unknown" for r in answered]
    level_mix = dict(sorted(Counter(levels).items(), key=lambda kv: level_ranks.get(kv[0], 99)))
    if total - len(answered):
        level_mix["unserved"] = total - len(answered)  # so that the mix always sums to the request count
    known = [gmacs_by_level[level] for level in levels if level in gmacs_by_level]
    cache_seen = [r for r in answered if r.cache is not None]
    server_flags = [r.server_budget_met for r in answered if r.server_budget_met is not None]
    latency = percentiles([r.latency_s * 1e3 for r in answered])
    answered_share = len(answered) / total if total else 0.0
    p99 = latency["p99"]
    step = {
        "label": label,
        "load_fraction": fraction,
        "burst": burst,
        "offered_rps": round(offered_rps, 3),
        "sent_rps": round(total / window_s, 3) if window_s > 0 else None,
        "requests": total,
        "answered": len(answered),
        "achieved_rps": round(len(answered) / wall_s, 3) if wall_s > 0 else 0.0,
        "wall_s": round(wall_s, 2),
        "latency_ms": latency,
        "attainment": round(sum(r.met_budget for r in results) / total, 4) if total else None,
        "attainment_server_side": round(sum(server_flags) / len(server_flags), 4) if server_flags else None,
        "mean_gmacs": round(float(np.mean(known)), 3) if known else None,
        "mean_level_rank": round(float(np.mean([level_ranks[v] for v in levels if v in level_ranks])), 3)
        if any(v in level_ranks for v in levels) else None,
        "level_mix": level_mix,
        "rejections": {"429": statuses.get(429, 0), "503": statuses.get(503, 0)},
        "timeouts": {"504": statuses.get(504, 0), "client": statuses.get(CLIENT_TIMEOUT, 0)},
        "other_errors": {str(code): n for code, n in statuses.items() if code not in {200, 429, 503, 504, 0}},
        "cache_hit_rate": round(sum(r.cache == "hit" for r in cache_seen) / len(cache_seen), 4)
        if cache_seen else None,
        "repeated_share_sent": round(sum(r.repeated for r in results) / total, 4) if total else None,
        "p99_under_1s": bool(p99 is not None and p99 < P99_LIMIT_MS and answered_share >= MIN_ANSWERED_SHARE),
        "restarted_after": restarted,
        "server": asdict(server) if server is not None else None,
    }
    return step


def latencies_ms(results: list[RequestResult]) -> list[float]:
    """Answered latencies, rounded, kept in the JSON for the CDF plot."""
    return [round(r.latency_s * 1e3, 2) for r in results if r.ok]


def verdicts(targets: dict[str, dict]) -> dict:
    """The issue's two targets, computed from the sweep (whatever they turn out to be)."""

    def step_at(name: str, fraction: float) -> dict | None:
        steps = targets.get(name, {}).get("steps", [])
        return next((s for s in steps if abs(s["load_fraction"] - fraction) < 1e-9 and not s["burst"]), None)

    seg80, fixed80 = step_at("segserve", 0.8), step_at("segserve-fixed", 0.8)
    attainment = {
        "load_fraction": 0.8,
        "segserve": seg80["attainment"] if seg80 else None,
        "fixed_level": fixed80["attainment"] if fixed80 else None,
        "target": 0.99,
    }
    attainment["met"] = None if attainment["segserve"] is None else attainment["segserve"] >= 0.99

    best: dict[str, dict | None] = {}
    for name, target in targets.items():
        ok = [s for s in target.get("steps", []) if s["p99_under_1s"] and not s["burst"]]
        top = max(ok, key=lambda s: s["offered_rps"]) if ok else None
        best[name] = None if top is None else {
            "load_fraction": top["load_fraction"], "offered_rps": top["offered_rps"],
            "achieved_rps": top["achieved_rps"], "p99_ms": top["latency_ms"]["p99"],
        }
    seg, plain = best.get("segserve"), best.get("plain")
    ratio = None
    if seg and plain and plain["achieved_rps"] > 0:
        ratio = round(seg["achieved_rps"] / plain["achieved_rps"], 2)
    met: bool | None
    if seg is None:
        met = False
    elif "plain" not in targets:
        met = None  # nothing to compare with
    else:
        met = plain is None or (ratio is not None and ratio >= 1.5)
    throughput = {"per_target": best, "ratio_segserve_to_plain": ratio, "target": 1.5, "met": met}
    if seg and "plain" in targets and not plain:
        # Then the plain endpoint's figure lies below the sweep's lowest step, so the ratio is a lower bound.
        throughput["note"] = "the plain endpoint had p99 >= 1 s (or < 99% answered) at every step of the sweep"
    return {"attainment_at_80": attainment, "throughput_p99_under_1s": throughput}
