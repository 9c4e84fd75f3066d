"""Server-side figures from segserve's `/metrics`: snapshots before and after a step, and their deltas.

Batch sizes only exist inside the server (a client sees its own batch size, and not the batches that
only held other requests), so they are read from the `segserve_batch_size` histogram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Snapshot:
    batch_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count, all levels
    batch_count: float = 0.0
    batch_sum: float = 0.0
    cache: dict[str, float] = field(default_factory=dict)  # result -> lookups
    rejected: dict[str, float] = field(default_factory=dict)  # reason -> count
    inflight: float = 0.0
    queue_depth: float = 0.0


def parse(text: str) -> Snapshot:
    snap = Snapshot()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "segserve_batch_size_bucket":
                le = float(labels["le"])
                snap.batch_buckets[le] = snap.batch_buckets.get(le, 0.0) + value
            elif name == "segserve_batch_size_count":
                snap.batch_count += value
            elif name == "segserve_batch_size_sum":
                snap.batch_sum += value
            elif name == "segserve_cache_requests_total":
                snap.cache[labels["result"]] = snap.cache.get(labels["result"], 0.0) + value
            elif name == "segserve_rejected_total":
                snap.rejected[labels["reason"]] = snap.rejected.get(labels["reason"], 0.0) + value
            elif name == "segserve_inflight_requests":
                snap.inflight = value
            elif name == "segserve_queue_depth":
                snap.queue_depth += value
    return snap


def batch_distribution(before: Snapshot, after: Snapshot) -> dict[str, int]:
    """Batches executed during the step by size bucket: {"1": n, "2": n, ..., "5-6": n}.

    The histogram's buckets are cumulative (le); differences of neighbours give the count per bucket,
    which is an exact size where neighbouring bounds are consecutive integers.
    """
    bounds = sorted(after.batch_buckets)
    result: dict[str, int] = {}
    previous_bound, previous_cumulative = 0.0, 0.0
    for bound in bounds:
        cumulative = after.batch_buckets[bound] - before.batch_buckets.get(bound, 0.0)
        count = round(cumulative - previous_cumulative)
        low = int(previous_bound) + 1
        if math.isinf(bound):
            label = f">{int(previous_bound)}"
        else:
            label = str(int(bound)) if low == int(bound) else f"{low}-{int(bound)}"
        if count:
            result[label] = count
        previous_bound, previous_cumulative = bound, cumulative
    return result


@dataclass
class StepServerStats:
    batches: int
    mean_batch_size: float | None
    batch_sizes: dict[str, int]
    cache_hits: int
    cache_misses: int
    rejected: dict[str, int]


def delta(before: Snapshot, after: Snapshot) -> StepServerStats:
    batches = round(after.batch_count - before.batch_count)
    items = after.batch_sum - before.batch_sum
    rejected = {reason: round(value - before.rejected.get(reason, 0.0)) for reason, value in after.rejected.items()}
    return StepServerStats(
        batches=batches,
        mean_batch_size=round(items / batches, 3) if batches else None,
        batch_sizes=batch_distribution(before, after),
        cache_hits=round(after.cache.get("hit", 0.0) - before.cache.get("hit", 0.0)),
        cache_misses=round(after.cache.get("miss", 0.0) - before.cache.get("miss", 0.0)),
        rejected={reason: n for reason, n in rejected.items() if n},
    )
