"""Overload: find the saturating load with a quick closed-loop ramp, then offer twice that rate open-loop
(requests sent on a schedule, whether or not earlier ones finished) and split the answers into admitted
(OK), shed (RESOURCE_EXHAUSTED) and the rest.

admitted_p99_ratio = p99 of admitted calls under overload / p99 of one caller alone (unloaded).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Callable

import grpc
import numpy as np

from fusionrec.bench import load
from fusionrec.bench.reliability import media
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc

Log = Callable[[str], None]


async def _one(stub: pb_grpc.RecommenderStub, request: pb.RecommendRequest, timeout_s: float,
               metadata: tuple) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        await stub.Recommend(request, timeout=timeout_s, metadata=metadata)
        code = "OK"
    except grpc.aio.AioRpcError as err:
        code = err.code().name
    return code, (time.perf_counter() - t0) * 1000


async def _open_loop(target: str, requests: list[pb.RecommendRequest], rate_qps: float, duration_s: float,
                     timeout_s: float, metadata: tuple) -> tuple[list[tuple[str, float]], float, float]:
    """Send at ``rate_qps`` for ``duration_s``: (code, ms) per call, the rate actually sent, and the p99 of
    how late calls were sent (the load generator's own lag: high means it, not the service, is saturated)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        await channel.channel_ready()
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


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def overload_requests(users: list[str], n: int = 16) -> list[pb.RecommendRequest]:
    """By user with an image query (distinct photos-like images): the image encoder, not the load generator
    sharing the 2 cores, is what saturates (by-user calls alone saturate the Python client first)."""
    return [pb.RecommendRequest(user_id=users[i % len(users)], k=10, query=pb.Content(
        image=media.picture(size=(224, 224), fmt="JPEG", seed=i))) for i in range(n)]


def run_overload(target: str, token: str, users: list[str], levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
                 ramp_s: float = 4.0, unloaded_s: float = 10.0, overload_s: float = 20.0, factor: float = 2.0,
                 timeout_s: float = 1.0, log: Log = print) -> dict[str, Any]:
    """The report's `overload` section (`overload_requests`; ``timeout_s`` is every call's deadline)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    requests = overload_requests(users)
    mix = [("image_query", requests, 1.0)]
    # One caller alone, long enough for a p99 of a few hundred calls; then the ramp to saturation.
    unloaded = load.closed_loop(target, mix, [1], unloaded_s, timeout_s=timeout_s, warmup_s=2.0,
                                metadata=metadata)[0]
    ramp = load.closed_loop(target, mix, list(levels), ramp_s, timeout_s=timeout_s, warmup_s=1.0, metadata=metadata)
    best = load.peak(ramp)
    log(f"  ramp: unloaded p99 {unloaded.p99_ms:.1f} ms; saturation {best.qps:.0f} req/s at {best.concurrency} callers")
    rate = factor * best.qps
    results, sent, lag_p99 = asyncio.run(_open_loop(target, requests, rate, overload_s, timeout_s, metadata))
    codes = Counter(code for code, _ in results)
    admitted = [ms for code, ms in results if code == "OK"]
    shed = [ms for code, ms in results if code == "RESOURCE_EXHAUSTED"]
    p99 = _pct(admitted, 99)
    out = {
        "unloaded_p99_ms": unloaded.p99_ms, "saturation_qps": best.qps, "saturation_concurrency": best.concurrency,
        "offered_qps": rate, "sent_qps": sent, "send_lag_p99_ms": lag_p99, "deadline_ms": timeout_s * 1000,
        "calls": len(results),
        "codes": dict(codes), "admitted_p50_ms": _pct(admitted, 50), "admitted_p99_ms": p99,
        "admitted_p99_ratio": p99 / unloaded.p99_ms if p99 is not None else None,
        "admitted_qps": len(admitted) / overload_s,
        "shed_fraction": len(shed) / len(results) if results else 0.0, "shed_median_ms": _pct(shed, 50),
        "failed_other_fraction": (len(results) - len(admitted) - len(shed)) / len(results) if results else 0.0,
        "ramp": load.as_dicts(ramp),
    }
    log(f"  {factor:g}x ({rate:.0f} req/s offered, {sent:.0f} sent): admitted p99 {p99} ms, "
        f"codes {dict(codes)}")
    return out
