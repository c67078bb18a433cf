"""Closed-loop gRPC load: N concurrent callers for a fixed time per level; QPS, latency, errors by code."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import grpc
import numpy as np

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc


@dataclass
class LevelResult:
    concurrency: int
    duration_s: float
    requests: int
    qps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    by_kind_p50_ms: dict[str, float] = field(default_factory=dict)


async def _run_level(target: str, mix: list[tuple[str, list[pb.RecommendRequest], float]], concurrency: int,
                     duration_s: float, timeout_s: float, seed: int, metadata: tuple = ()) -> LevelResult:
    kinds = [k for k, _, _ in mix]
    weights = [w for _, _, w in mix]
    requests = {k: r for k, r, _ in mix}
    latencies: dict[str, list[float]] = {k: [] for k in kinds}
    errors: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        await channel.channel_ready()
        stop_at = time.perf_counter() + duration_s

        async def caller(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < stop_at:
                kind = rng.choices(kinds, weights)[0]
                t0 = time.perf_counter()
                try:
                    await stub.Recommend(rng.choice(requests[kind]), timeout=timeout_s, metadata=metadata)
                    latencies[kind].append((time.perf_counter() - t0) * 1000)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] += 1

        t_start = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t_start
    every = np.array([x for v in latencies.values() for x in v] or [float("nan")])
    done = sum(len(v) for v in latencies.values())
    return LevelResult(
        concurrency=concurrency, duration_s=elapsed, requests=done, qps=done / elapsed,
        p50_ms=float(np.percentile(every, 50)), p95_ms=float(np.percentile(every, 95)),
        p99_ms=float(np.percentile(every, 99)), errors=dict(errors),
        by_kind_p50_ms={k: float(np.percentile(v, 50)) for k, v in latencies.items() if v})


def closed_loop(target: str, mix: list[tuple[str, list[pb.RecommendRequest], float]], levels: list[int],
                duration_s: float, timeout_s: float = 5.0, warmup_s: float = 3.0,
                progress: Callable[[LevelResult], None] | None = None, metadata: tuple = ()) -> list[LevelResult]:
    """Run each concurrency level in turn (after a short warm-up) and return one result per level.

    mix: (kind, requests, weight) triples; callers draw a kind by weight, then one of its requests.
    """
    asyncio.run(_run_level(target, mix, max(levels), warmup_s, timeout_s, seed=0, metadata=metadata))
    results = []
    for level in levels:
        result = asyncio.run(_run_level(target, mix, level, duration_s, timeout_s, seed=level, metadata=metadata))
        results.append(result)
        if progress:
            progress(result)
    return results


def peak(results: list[LevelResult]) -> LevelResult:
    """The level with the highest throughput."""
    return max(results, key=lambda r: r.qps)


def knee(results: list[LevelResult], share: float = 0.9) -> LevelResult:
    """The lowest concurrency that reaches `share` of the peak throughput.

    On a saturated 2-core machine throughput plateaus while latency keeps growing with the queue;
    the knee is where a deployment would cap concurrency (e.g. max_concurrent_rpcs).
    """
    best = peak(results).qps
    return min((r for r in results if r.qps >= share * best), key=lambda r: r.concurrency)


def as_dicts(results: list[LevelResult]) -> list[dict]:
    return [asdict(r) for r in results]


def plot_curves(curves: dict[str, list[LevelResult]], path, title: str) -> None:
    """Throughput and p99 against concurrency, one line per curve (e.g. recommend vs floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, results in curves.items():
        xs = [r.concurrency for r in results]
        ax_q.plot(xs, [r.qps for r in results], marker="o", label=name)
        ax_l.plot(xs, [r.p99_ms for r in results], marker="o", label=name)
    ax_l.set_yscale("log")  # overloaded curves (queries queueing on encoders) would flatten the rest
    for ax, label in ((ax_q, "requests/s"), (ax_l, "p99 latency, ms (log)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
