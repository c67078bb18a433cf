"""Open-loop gRPC load: Poisson arrivals at fixed rates, and the highest rate whose p99 stays within a bound.

A closed loop (N callers, each waiting for its answer) slows its own arrivals when the service slows,
so its p99 at 32 callers measures the queue the callers make, not the service. Here requests arrive
on a schedule drawn in advance (exponential gaps, mean 1/rate) whatever the answers do, and each
latency runs from the request's scheduled arrival, so a late send (a busy client) counts too.
A failed or timed-out request counts as an infinitely slow one.

``find_slo_rates`` walks a ladder of rates for several targets in turn (at each rate every target
still within the bound runs once, in alternating order, so slow drifts of the machine hit both),
drops a target at its first rate over the bound, then bisects between its last good and first
bad rate.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import grpc
import numpy as np

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc

DEFAULT_RATES_QPS = (25.0, 50.0, 75.0, 100.0, 130.0, 160.0, 200.0, 250.0, 300.0, 400.0)
DEFAULT_BOUND_MS = 50.0


@dataclass
class RateResult:
    """One target at one offered rate."""

    name: str
    rate_qps: float
    duration_s: float
    sent: int
    ok: int
    achieved_qps: float
    p50_ms: float
    p99_ms: float  # nearest rank; inf when over 1 % of the requests failed
    send_lag_p99_ms: float  # how late the client sent (its own share of the latency)
    errors: dict[str, int] = field(default_factory=dict)


def poisson_offsets(rate_qps: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times in [0, duration_s) of a Poisson process at ``rate_qps`` (exponential gaps)."""
    if rate_qps <= 0 or duration_s <= 0:
        return np.zeros(0)
    n = int(rate_qps * duration_s + 6 * math.sqrt(rate_qps * duration_s) + 10)  # enough gaps, almost surely
    times = np.cumsum(rng.exponential(1.0 / rate_qps, n))
    while times[-1] < duration_s:  # the rare short draw: extend it
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate_qps, n))])
    return times[times < duration_s]


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-th percentile by nearest rank (inf entries allowed: failures sort last)."""
    if not len(values):
        return float("nan")
    ordered = np.sort(np.asarray(values, dtype=float))
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])


async def run_rate(target: str, requests: Sequence[pb.RecommendRequest], rate_qps: float, duration_s: float,
                   *, name: str = "", timeout_s: float = 5.0, seed: int = 0, metadata: tuple = ()) -> RateResult:
    """Send Recommend requests to ``target`` on a Poisson schedule at ``rate_qps`` for ``duration_s``."""
    offsets = poisson_offsets(rate_qps, duration_s, np.random.default_rng(seed))
    pick = random.Random(seed)
    latencies: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        await channel.channel_ready()
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05

        async def one(request: pb.RecommendRequest, at: float) -> None:
            lags.append((loop.time() - at) * 1e3)
            try:
                await stub.Recommend(request, timeout=timeout_s, metadata=metadata)
                latencies.append((loop.time() - at) * 1e3)
            except grpc.aio.AioRpcError as err:
                errors[err.code().name] += 1

        tasks = []
        for offset in offsets:
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(pick.choice(requests), start + offset)))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    failed = sum(errors.values())
    every = latencies + [math.inf] * failed
    return RateResult(name=name, rate_qps=rate_qps, duration_s=elapsed, sent=len(offsets), ok=len(latencies),
                      achieved_qps=len(latencies) / elapsed, p50_ms=nearest_rank(every, 50),
                      p99_ms=nearest_rank(every, 99), send_lag_p99_ms=nearest_rank(lags, 99), errors=dict(errors))


Measure = Callable[[str, float], RateResult]  # (target name, rate) -> result


def find_slo_rates(names: Sequence[str], measure: Measure, rates: Sequence[float] = DEFAULT_RATES_QPS,
                   bound_ms: float = DEFAULT_BOUND_MS, refine_steps: int = 2,
                   progress: Callable[[RateResult], None] | None = None) -> dict[str, dict]:
    """Per target: the highest rate whose p99 <= bound_ms, with every lower rate tried also within it.

    Returns name -> {"slo_qps": float (0.0 if no rate tried passed), "first_over_qps": float | None
    (None: never over the bound up to the top rate), "results": [RateResult as dict, ...] by rate}.
    """
    results: dict[str, list[RateResult]] = {n: [] for n in names}
    good: dict[str, float] = {n: 0.0 for n in names}
    bad: dict[str, float | None] = {n: None for n in names}

    def run(name: str, rate: float) -> None:
        r = measure(name, rate)
        results[name].append(r)
        if progress:
            progress(r)
        if r.p99_ms <= bound_ms:
            good[name] = max(good[name], rate)
        else:
            bad[name] = rate if bad[name] is None else min(bad[name], rate)

    for step, rate in enumerate(sorted(rates)):
        active = [n for n in names if bad[n] is None]
        for name in active if step % 2 == 0 else reversed(active):
            run(name, rate)
    for _ in range(refine_steps):
        pending = [n for n in names if bad[n] is not None and bad[n] - good[n] > 0.05 * bad[n]]
        for name in pending:
            run(name, round((good[name] + bad[name]) / 2, 1))
    return {n: {"slo_qps": good[n], "first_over_qps": bad[n],
                "results": [asdict(r) for r in sorted(results[n], key=lambda r: r.rate_qps)]} for n in names}


def measure_targets(targets: dict[str, tuple[str, Sequence[pb.RecommendRequest]]], duration_s: float,
                    timeout_s: float = 5.0, warmup_s: float = 2.0, min_requests: int = 400) -> Measure:
    """A ``measure`` over named (address, requests) targets: a short unmeasured warm-up at the same rate,
    then the measured run (seeded by the rate, so both targets see the same schedule), long enough for
    ``min_requests`` (a p99 of 60 requests is their worst one)."""

    def measure(name: str, rate: float) -> RateResult:
        address, requests = targets[name]
        asyncio.run(run_rate(address, requests, rate, warmup_s, name=name, timeout_s=timeout_s, seed=1))
        return asyncio.run(run_rate(address, requests, rate, max(duration_s, min_requests / rate), name=name,
                                    timeout_s=timeout_s, seed=int(rate * 10)))

    return measure


def settle(targets: dict[str, tuple[str, Sequence[pb.RecommendRequest]]], rate: float, seconds: float) -> None:
    """Unmeasured traffic at ``rate`` on every target: a store just seeded (flushes, caches) and fresh
    replicas answer their first seconds slower than they will after."""
    for name, (address, requests) in targets.items():
        asyncio.run(run_rate(address, requests, rate, seconds, name=name, seed=2))


def plot(curves: dict[str, dict], bound_ms: float, path, title: str) -> None:
    """p99 (and p50) against offered rate, one line per target, the bound and each target's SLO rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    cap = 20 * bound_ms  # failures (inf) and meltdowns drawn at the top edge
    for (name, curve), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green")):
        rs = curve["results"]
        xs = [r["rate_qps"] for r in rs]
        ax.plot(xs, [min(r["p99_ms"], cap) for r in rs], "-o", color=color, label=f"{name} p99")
        ax.plot(xs, [min(r["p50_ms"], cap) for r in rs], ":", color=color, label=f"{name} p50")
        if curve["slo_qps"]:
            ax.axvline(curve["slo_qps"], color=color, lw=0.8, ls="--")
            ax.annotate(f"{curve['slo_qps']:.0f}/s", (curve["slo_qps"], bound_ms), color=color,
                        textcoords="offset points", xytext=(3, 6), fontsize=8)
    ax.axhline(bound_ms, color="grey", lw=0.8, ls=":", label=f"bound p99 {bound_ms:.0f} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate, requests/s (Poisson arrivals)")
    ax.set_ylabel("latency from scheduled arrival, ms (log)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- on the service


def deploy_floor_beside(config, app_name: str) -> tuple[str, str]:
    """The floor (bench/floor.py: the real Gateway over no-op deployments) as a second Serve app beside
    the running one, so both are measured on the same machine state, interleaved. Its replicas reserve
    no CPU (they do no work; the real app holds the reservations). Returns (floor app name, target)."""
    from ray import serve

    from fusionrec.bench.floor import build_floor_app
    from fusionrec.gateway.runtime import ready_everywhere, render_config

    app = render_config(config, {"server": {"port": 0}})["applications"][0]
    deployments = [d | {"ray_actor_options": (d.get("ray_actor_options") or {}) | {"num_cpus": 0}}
                   for d in app.get("deployments") or []]
    name = f"{app_name}-floor"
    handle = serve.run(build_floor_app(app.get("args") or {}, deployments), name=name, route_prefix=None)
    info = ready_everywhere(handle, name, timeout_s=300)
    return name, f"{info['host']}:{info['port']}"


def measure_with_floor(config, app_name: str, target: str, users: list[str], out_dir, *,
                       rates: Sequence[float] = DEFAULT_RATES_QPS, duration_s: float = 10.0,
                       bound_ms: float = DEFAULT_BOUND_MS, n_items: int = 0, settle_s: float = 20.0,
                       log: Callable[[str], None] = print) -> dict:
    """Recommend by user on the running app and on the floor beside it, interleaved rate by rate;
    writes openloop.json / openloop.png and returns summary.json's figures."""
    from ray import serve

    requests = [pb.RecommendRequest(user_id=u, k=10) for u in users]
    floor_app, floor_target = deploy_floor_beside(config, app_name)
    try:
        targets = {"recommend": (target, requests), "floor": (floor_target, requests)}
        settle(targets, min(rates), settle_s)
        measure = measure_targets(targets, duration_s)
        curves = find_slo_rates(["recommend", "floor"], measure, rates, bound_ms, progress=lambda r: log(
            f"  {r.name:<9} {r.rate_qps:6.1f}/s offered: {r.achieved_qps:6.1f}/s ok, p50 {r.p50_ms:7.1f} ms, "
            f"p99 {r.p99_ms:7.1f} ms, send lag p99 {r.send_lag_p99_ms:5.1f} ms {r.errors or ''}"))
    finally:
        serve.delete(floor_app)
    rec, floor = curves["recommend"]["slo_qps"], curves["floor"]["slo_qps"]
    headline = {"recommend_slo_qps": rec, "floor_slo_qps": floor,
                "recommend_to_floor_slo_qps": rec / floor if floor else float("nan"),
                "slo_p99_ms": bound_ms}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "openloop.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "n_items": n_items, "duration_s": duration_s, "rates_qps": list(rates),
         **headline, "curves": _finite(curves)}, indent=2))
    plot(curves, bound_ms, out / "openloop.png",
         f"Recommend by user over {n_items:,} items vs the floor: open loop, p99 bound {bound_ms:.0f} ms")
    return headline


def _finite(x):
    """JSON has no inf: a p99 over failed requests is written as null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x
