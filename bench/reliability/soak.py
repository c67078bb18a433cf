"""A mixed soak: steady writes (over a fixed set of ids, so the data does not grow) and reads for a while;
every failed call counts, and each replica's RSS is compared between the end of a warm-up and the end.

The target figure (`rss_growth_max`) compares two single samples: the first after the warm-up and the
last. The Retrieval replica's RSS saw-tooths by 5-10 % between Milvus Lite flushes, so the report also
gives the growth between the medians of the first and the last minute of samples (`rss_growth_median`),
which one sample caught at a peak or a trough does not move; the target stays on the single samples.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any, Callable

from fusionrec.bench.reliability import processes
from fusionrec.bench.reliability.traffic import Traffic, TrafficPlan

Log = Callable[[str], None]


def run_soak(target: str, token: str, root_pid: int, versions: dict[str, str], dim: int, duration_s: float = 600,
             warmup_s: float = 60, sample_every_s: float = 15, log: Log = print) -> dict[str, Any]:
    """The report's `soak` section. RSS is sampled every ``sample_every_s``; growth is measured from the
    first sample after ``warmup_s`` (caches, allocator pools and lazy imports fill first)."""
    plan = TrafficPlan(writers=1, readers=2, pause_s=0.1, id_prefix="soak", id_space=64)
    users = [f"rel-user-{i}" for i in range(8)]
    samples: list[tuple[float, dict[str, int]]] = []
    traffic = Traffic(target, token, versions, dim, plan, users).start()
    t0 = time.monotonic()
    try:
        time.sleep(warmup_s)
        end = time.monotonic() + duration_s
        while True:
            samples.append((time.monotonic() - t0, processes.rss_by_replica(root_pid)))
            if time.monotonic() >= end:
                break
            time.sleep(min(sample_every_s, max(end - time.monotonic(), 0)))
    finally:
        counts = traffic.stop()
    first, last = samples[0][1], samples[-1][1]
    growth = relative_growth(first, last)
    worst = max(growth, key=growth.get) if growth else None
    smoothed = median_growth(samples, window_s=60)
    log(f"  soak {duration_s:.0f} s: {sum(counts.ok.values())} calls ok, {counts.error_total()} failed; "
        f"largest RSS growth {worst} {growth.get(worst, 0):+.1%}" if worst else "  soak: no replica found")
    return {"duration_s": duration_s, "warmup_s": warmup_s, "calls_ok": dict(counts.ok),
            "errors": counts.error_total(), "errors_by_call": dict(counts.errors),
            "rss_growth_max": growth.get(worst) if worst else None, "rss_growth_max_replica": worst,
            "rss_growth": growth, "replicas_replaced": sorted(set(first) ^ set(last)),
            "rss_growth_median": smoothed, "rss_growth_median_max": max(smoothed.values(), default=None),
            "rss_mb": [{"t_s": round(t, 1), **{k: round(v / 2**20, 1) for k, v in s.items()}} for t, s in samples]}


def relative_growth(first: dict[str, float], last: dict[str, float]) -> dict[str, float]:
    """Per replica present in both: (last - first) / first."""
    return {k: (last[k] - first[k]) / first[k] for k in first if k in last and first[k]}


def median_growth(samples: list[tuple[float, dict[str, int]]], window_s: float) -> dict[str, float]:
    """Growth between the median RSS of the samples in the first ``window_s`` and in the last ``window_s``."""
    if not samples:
        return {}
    t_first, t_last = samples[0][0], samples[-1][0]

    def medians(kept: list[dict[str, int]]) -> dict[str, float]:
        names = set().union(*kept)
        return {k: median(s[k] for s in kept if k in s) for k in names}

    return relative_growth(medians([s for t, s in samples if t <= t_first + window_s]),
                           medians([s for t, s in samples if t >= t_last - window_s]))
