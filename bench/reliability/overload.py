"""Overload: find the saturating load with a quick closed-loop ramp, then offer twice that rate open-loop
(requests sent on a schedule, whether or not earlier ones finished) and split the answers into admitted
(OK), shed (RESOURCE_EXHAUSTED) and the rest. Ramp and overload share one connection, so one Gateway
replica (each keeps its own admission estimate) sees both; lone calls first go over several connections.

admitted_p99_ratio = p99 of admitted calls under overload / p99 of one caller alone (unloaded).

The surge starts from the replicas the unloaded baseline was measured on (``root_pid`` given): the ramp's
top levels queue 16-32 calls at the image encoder, and Serve then adds a replica (upscale after 1 s) that
it keeps for `downscale_delay_s` (30 s) after the ramp. Surged on right away, that replica's 6-8 s of
start-up took a core from the two that serve; surged on once it had started, two image replicas shared
the 2 cores with everything else and served fewer calls (26.6-26.9 against 29-38 req/s) at a higher p99:
ratios 1.5-2.3 where runs on the baseline's replicas gave 1.1-1.5 (fifteen runs, 2026-11-30 evening).
Either way the ratio measured the harness's own probe, not the surge, so the settle waits until every
deployment is back at its baseline count and no replica is younger than `SETTLE_AGE_S` (at least
`SETTLE_MIN_S`, at most `SETTLE_MAX_S`; the report says whether it settled). Autoscaling stays on during the
surge, and the report records any replica started while it ran.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Callable

import grpc
import numpy as np
import psutil

from fusionrec.bench import load
from fusionrec.bench.reliability import media, processes
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc

Log = Callable[[str], None]

SETTLE_MIN_S = 8.0  # Serve's autoscaler decides on the ramp's queue within a few seconds after it
SETTLE_AGE_S = 12.0  # a replica process this old has finished starting (6-8 s here, under load)
SETTLE_MAX_S = 90.0  # Serve's downscale delay (30 s in deploy/local.yaml), then a graceful stop


def _replica_ages_s(root_pid: int) -> dict[str, list[float]]:
    """Deployment name -> ages of its replica processes, in seconds."""
    now = time.time()
    ages: dict[str, list[float]] = {}
    for name, procs in processes.replicas(root_pid).items():
        for proc in procs:
            try:
                ages.setdefault(name, []).append(now - proc.create_time())
            except psutil.Error:  # gone meanwhile
                continue
    return ages


def _replica_counts(root_pid: int) -> dict[str, int]:
    """Deployment name -> how many replica processes it has now."""
    return {name: len(procs) for name, procs in sorted(processes.replicas(root_pid).items())}


async def _settle(root_pid: int, baseline: dict[str, int]) -> dict[str, Any]:
    """Wait until every deployment is back at its ``baseline`` replica count and none started within
    `SETTLE_AGE_S` (at least `SETTLE_MIN_S`, at most `SETTLE_MAX_S`)."""
    t0 = time.monotonic()
    while True:
        ages = _replica_ages_s(root_pid)
        youngest = min((a for found in ages.values() for a in found), default=float("inf"))
        counts = {name: len(found) for name, found in sorted(ages.items())}
        back = all(counts.get(name, 0) <= n for name, n in baseline.items())
        settled = back and youngest >= SETTLE_AGE_S
        waited = time.monotonic() - t0
        if (waited >= SETTLE_MIN_S and settled) or waited >= SETTLE_MAX_S:
            return {"settle_s": round(waited, 1), "settled": settled, "baseline_replicas": baseline,
                    "replicas": counts}
        await asyncio.sleep(0.5)


async def _one(stub: pb_grpc.RecommenderStub, request: pb.RecommendRequest, timeout_s: float,
               metadata: tuple) -> tuple[str, float]:
    """(status code name, latency in ms) of one Recommend."""
    t0 = time.perf_counter()
    try:
        await stub.Recommend(request, timeout=timeout_s, metadata=metadata)
        code = "OK"
    except grpc.aio.AioRpcError as err:
        code = err.code().name
    return code, (time.perf_counter() - t0) * 1000


async def _open_loop(stub: pb_grpc.RecommenderStub, requests: list[pb.RecommendRequest], rate_qps: float,
                     duration_s: float, timeout_s: float,
                     metadata: tuple) -> tuple[list[tuple[str, float]], float, float]:
    """Send at ``rate_qps`` for ``duration_s``: (code, ms) per call, the rate actually sent, and the p99 of
    how late calls were sent (the load generator's own lag: high means it, not the service, is saturated)."""
    loop = asyncio.get_running_loop()
    start, n = loop.time(), int(rate_qps * duration_s)
    tasks, late_ms = [], []
    for i in range(n):
        delay = start + i / rate_qps - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        late_ms.append(max(-delay, 0.0) * 1000)
        tasks.append(asyncio.create_task(_one(stub, requests[i % len(requests)], timeout_s, metadata)))
    sent_rate = n / max(loop.time() - start, 1e-9)
    return list(await asyncio.gather(*tasks)), sent_rate, float(np.percentile(late_ms or [0.0], 99))


async def _level(stub: pb_grpc.RecommenderStub, requests: list[pb.RecommendRequest], callers: int,
                 duration_s: float, timeout_s: float, metadata: tuple) -> load.LevelResult:
    """``callers`` closed-loop callers (each sends its next call when its last one answered) for ``duration_s``."""
    ok_ms: list[float] = []
    errors: Counter[str] = Counter()
    t0 = time.perf_counter()

    async def caller(c: int) -> None:
        i = c
        while time.perf_counter() - t0 < duration_s:
            code, ms = await _one(stub, requests[i % len(requests)], timeout_s, metadata)
            if code == "OK":
                ok_ms.append(ms)
            else:
                errors[code] += 1
            i += callers

    await asyncio.gather(*(caller(c) for c in range(callers)))
    elapsed = time.perf_counter() - t0
    every = ok_ms or [float("nan")]
    return load.LevelResult(callers, elapsed, len(ok_ms), len(ok_ms) / elapsed, *(
        float(np.percentile(every, q)) for q in (50, 95, 99)), dict(errors), {"image_query": float(np.median(every))})


async def _ramp_then_overload(target: str, requests: list[pb.RecommendRequest], levels: tuple[int, ...], ramp_s: float,
                              factor: float, overload_s: float, timeout_s: float, metadata: tuple,
                              root_pid: int | None, baseline: dict[str, int]):
    """The closed-loop ramp, (settling,) then ``factor`` x its peak throughput open-loop, all on one connection:
    one Gateway replica (of those sharing the port) sees the whole sequence, as a replica under a real surge
    would (its admission state is its own)."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        await channel.channel_ready()
        ramp = [await _level(stub, requests, c, ramp_s, timeout_s, metadata) for c in levels]
        rate = factor * load.peak(ramp).qps
        settle = await _settle(root_pid, baseline) if root_pid is not None else {}
        return ramp, settle, rate, await _open_loop(stub, requests, rate, overload_s, timeout_s, metadata)


async def _alone(target: str, requests: list[pb.RecommendRequest], duration_s: float, timeout_s: float,
                 metadata: tuple) -> list[float]:
    """One caller, one call at a time, for ``duration_s`` on a connection of its own (a local subchannel pool:
    gRPC would otherwise reuse one connection for every channel, and with it one Gateway replica): the
    latency in ms of each call that succeeded."""
    latencies = []
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        await channel.channel_ready()
        stop_at, i = time.perf_counter() + duration_s, 0
        while time.perf_counter() < stop_at:
            code, ms = await _one(stub, requests[i % len(requests)], timeout_s, metadata)
            if code == "OK":
                latencies.append(ms)
            i += 1
    return latencies


def unloaded_latencies(target: str, requests: list[pb.RecommendRequest], duration_s: float, timeout_s: float,
                       metadata: tuple, connections: int = 6) -> list[float]:
    """Lone calls over ``connections`` connections in turn, so that every Gateway replica behind the shared
    port most likely served some: each measures its own lone-request latency, the latency objective's base
    (gateway/admission.py), and the overload's traffic may reach any of them."""
    per = duration_s / connections
    out: list[float] = []
    for _ in range(connections):
        out += asyncio.run(_alone(target, requests, per, timeout_s, metadata))
    return out


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def overload_requests(users: list[str], n: int = 16) -> list[pb.RecommendRequest]:
    """By user with an image query (distinct photos-like images): the image encoder, not the load generator
    sharing the 2 cores, is what saturates (by-user calls alone saturate the Python client first)."""
    return [pb.RecommendRequest(user_id=users[i % len(users)], k=10, query=pb.Content(
        image=media.picture(size=(224, 224), fmt="JPEG", seed=i))) for i in range(n)]


def run_overload(target: str, token: str, users: list[str], levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
                 ramp_s: float = 4.0, unloaded_s: float = 30.0, overload_s: float = 20.0, factor: float = 2.0,
                 timeout_s: float = 1.0, root_pid: int | None = None, log: Log = print) -> dict[str, Any]:
    """The report's `overload` section (`overload_requests`; ``timeout_s`` is every call's deadline;
    ``root_pid``: the service's process tree, to settle after the ramp and see replica starts)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    requests = overload_requests(users)
    # One caller alone, long enough for a p99 of ~800 calls (10 s gave ~290: the 3rd slowest, 49-70 ms over
    # the runs of one evening); then the ramp to saturation.
    unloaded_latencies(target, requests, 2.0, timeout_s, metadata, connections=2)  # warm-up, not counted
    unloaded_ms = unloaded_latencies(target, requests, unloaded_s, timeout_s, metadata)
    unloaded_p99 = _pct(unloaded_ms, 99)
    baseline = _replica_counts(root_pid) if root_pid is not None else {}
    ramp, settle, rate, (results, sent, lag_p99) = asyncio.run(_ramp_then_overload(
        target, requests, levels, ramp_s, factor, overload_s, timeout_s, metadata, root_pid, baseline))
    # Replica processes younger than the surge (plus the tail of its calls): started while it ran.
    started = {name: len([a for a in found if a < overload_s + 2 * timeout_s])
               for name, found in (_replica_ages_s(root_pid) if root_pid is not None else {}).items()}
    best = load.peak(ramp)
    log(f"  ramp: unloaded p99 {unloaded_p99:.1f} ms; saturation {best.qps:.0f} req/s at {best.concurrency} callers; "
        f"settled {settle}; replicas started during the surge: {started}")
    codes = Counter(code for code, _ in results)
    admitted = [ms for code, ms in results if code == "OK"]
    shed = [ms for code, ms in results if code == "RESOURCE_EXHAUSTED"]
    p99 = _pct(admitted, 99)
    # Diagnostic only (the target is on every call): calls sent after the admission's 2 s rate window.
    steady = [ms for i, (code, ms) in enumerate(results) if code == "OK" and i >= 2 * rate]
    # Per 0.5 s of send time: admitted p99 and shed share (where in the surge the slow calls were).
    timeline = []
    for start in np.arange(0.0, overload_s, 0.5):
        window = results[int(start * rate):int((start + 0.5) * rate)]
        ok_ms = [ms for code, ms in window if code == "OK"]
        timeline.append({"t_s": float(start), "calls": len(window), "admitted": len(ok_ms),
                         "admitted_p99_ms": _pct(ok_ms, 99), "admitted_max_ms": max(ok_ms, default=None)})
    out = {
        "unloaded_p99_ms": unloaded_p99, "unloaded_p50_ms": _pct(unloaded_ms, 50), "unloaded_calls": len(unloaded_ms),
        "saturation_qps": best.qps, "saturation_concurrency": best.concurrency,
        "offered_qps": rate, "sent_qps": sent, "send_lag_p99_ms": lag_p99, "deadline_ms": timeout_s * 1000,
        "calls": len(results),
        "codes": dict(codes), "admitted_p50_ms": _pct(admitted, 50), "admitted_p99_ms": p99,
        "admitted_p99_ratio": p99 / unloaded_p99 if p99 is not None and unloaded_p99 else None,
        "admitted_qps": len(admitted) / overload_s, "admitted_p99_after_2s_ms": _pct(steady, 99),
        "shed_fraction": len(shed) / len(results) if results else 0.0, "shed_median_ms": _pct(shed, 50),
        "failed_other_fraction": (len(results) - len(admitted) - len(shed)) / len(results) if results else 0.0,
        "ramp": load.as_dicts(ramp), "settle": settle,
        "replicas_started_during": {name: n for name, n in started.items() if n}, "timeline": timeline,
    }
    log(f"  {factor:g}x ({rate:.0f} req/s offered, {sent:.0f} sent): admitted p99 {p99} ms, "
        f"codes {dict(codes)}")
    return out
