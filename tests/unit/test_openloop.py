"""The open-loop load generator (bench/openloop.py): Poisson schedule, latency from the scheduled
arrival against a real grpc.aio server, failures as infinitely slow, and the SLO rate search."""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np

from fusionrec.bench.openloop import RateResult, find_slo_rates, nearest_rank, poisson_offsets, run_rate
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc


def test_poisson_offsets_are_a_poisson_process():
    rate, duration = 200.0, 50.0
    t = poisson_offsets(rate, duration, np.random.default_rng(0))
    assert np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] < duration
    assert abs(len(t) - rate * duration) < 4 * math.sqrt(rate * duration)  # Poisson count, 4 sigma
    gaps = np.diff(t)
    assert abs(gaps.mean() * rate - 1) < 0.05
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05  # exponential: CV 1 (a fixed-rate ticker has 0)
    assert abs(np.mean(gaps > 1 / rate) - math.exp(-1)) < 0.02  # P(gap > mean) = 1/e
    counts = np.histogram(t, bins=np.arange(0, duration + 1e-9, 1.0))[0]  # per second: variance = mean
    assert 0.8 < counts.var() / counts.mean() < 1.25
    again = poisson_offsets(rate, duration, np.random.default_rng(0))
    np.testing.assert_array_equal(t, again)  # the schedule is drawn in advance, from the seed
    assert poisson_offsets(0, 10, np.random.default_rng(0)).size == 0


def test_nearest_rank_sorts_failures_last():
    assert nearest_rank([5, 1, 3, 2, 4], 50) == 3
    assert nearest_rank(list(range(1, 101)), 99) == 99
    assert nearest_rank([1.0] * 99 + [math.inf], 99) == 1.0  # one failure in 100 is within p99
    assert nearest_rank([1.0] * 98 + [math.inf] * 2, 99) == math.inf


class _OneAtATime(pb_grpc.RecommenderServicer):
    """A real gRPC service that answers one request at a time in ``service_s`` (capacity 1/service_s),
    and fails every ``fail_every``-th request with UNAVAILABLE."""

    def __init__(self, service_s: float, fail_every: int = 0) -> None:
        self.service_s, self.fail_every, self.calls = service_s, fail_every, 0
        self.lock = asyncio.Lock()

    async def Recommend(self, request, context):  # noqa: N802 (gRPC method name)
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "failing on purpose")
        async with self.lock:
            await asyncio.sleep(self.service_s)
        return pb.RecommendResponse()


def _against(servicer: _OneAtATime, rate: float, duration_s: float) -> RateResult:
    async def main() -> RateResult:
        server = grpc.aio.server()
        pb_grpc.add_RecommenderServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await run_rate(f"127.0.0.1:{port}", [pb.RecommendRequest(user_id="u", k=1)], rate, duration_s,
                                  name="t", timeout_s=10, seed=3)
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_under_capacity_latency_is_the_service_time():
    r = _against(_OneAtATime(0.005), rate=20, duration_s=2.0)  # 10 % utilisation
    assert r.sent == r.ok > 20 and not r.errors
    assert 5 <= r.p50_ms < 100 and r.p99_ms < 400
    assert abs(r.achieved_qps - r.sent / r.duration_s) < 1e-6


def test_over_capacity_arrivals_keep_coming_and_the_queue_shows():
    """40/s capacity, 100/s offered: a closed loop would slow its own arrivals to 40/s; here the
    schedule holds, so the backlog (and the latency from arrival) grows through the run."""
    servicer = _OneAtATime(0.025)
    r = _against(servicer, rate=100, duration_s=1.5)
    assert r.sent > 100 and servicer.calls == r.sent  # every scheduled request was sent
    assert r.send_lag_p99_ms < 100  # sent on time: the client was not the bottleneck
    assert r.p99_ms > 1000 > 200 > r.p50_ms / 10  # ~90 queued x 25 ms by the end


def test_failures_count_as_infinitely_slow():
    r = _against(_OneAtATime(0.001, fail_every=10), rate=40, duration_s=1.5)
    assert r.errors.get("UNAVAILABLE", 0) >= 4 and r.ok + sum(r.errors.values()) == r.sent
    assert r.p99_ms == math.inf  # 10 % failed: p99 is over any bound


def _model(capacity: dict[str, float], calls: list[tuple[str, float]]):
    """A queue model: p99 = 5 ms / (1 - load) below capacity, failures (inf) at or above it."""
    def measure(name: str, rate: float) -> RateResult:
        calls.append((name, rate))
        load = rate / capacity[name]
        p99 = 5.0 / (1 - load) if load < 1 else math.inf
        return RateResult(name, rate, 1.0, int(rate), int(rate), rate, p99 / 2, p99, 0.0)
    return measure


def test_slo_rate_search_ladder_then_bisection():
    calls: list[tuple[str, float]] = []
    # p99 <= 50 ms while rate <= 0.9 x capacity: thresholds at 90/s and 180/s
    out = find_slo_rates(["a", "b"], _model({"a": 100.0, "b": 200.0}, calls), rates=(40, 80, 120, 160, 240),
                         bound_ms=50.0, refine_steps=3)
    assert out["a"]["first_over_qps"] is not None and out["a"]["slo_qps"] <= 90 <= out["a"]["first_over_qps"]
    assert out["b"]["slo_qps"] <= 180 <= out["b"]["first_over_qps"]
    assert out["a"]["slo_qps"] > 80 and out["b"]["slo_qps"] > 160  # bisection moved past the ladder's rung
    a_rates = [r for n, r in calls if n == "a"]
    assert 160 not in a_rates and 240 not in a_rates  # no rungs above a target's first failure
    ladder = [c for c in calls if c[1] in (40, 80, 120)]
    assert ladder[:6] == [("a", 40), ("b", 40), ("b", 80), ("a", 80), ("a", 120), ("b", 120)]  # alternating
    for name in "ab":  # results come back by rate, each within the bound up to slo_qps
        rs = out[name]["results"]
        assert [r["rate_qps"] for r in rs] == sorted(r["rate_qps"] for r in rs)
        assert all(r["p99_ms"] <= 50 for r in rs if r["rate_qps"] <= out[name]["slo_qps"])


def test_slo_rate_search_below_the_lowest_rung_and_never_over():
    model = _model({"slow": 10.0, "fast": 1e6}, [])
    out = find_slo_rates(["slow", "fast"], model, rates=(20, 40), bound_ms=50, refine_steps=0)
    assert out["slow"]["slo_qps"] == 0.0 and out["slow"]["first_over_qps"] == 20
    assert out["fast"]["slo_qps"] == 40 and out["fast"]["first_over_qps"] is None
    out = find_slo_rates(["slow"], model, rates=(20, 40), bound_ms=50, refine_steps=2)  # bisects below 20
    assert 0 < out["slow"]["slo_qps"] <= 9 and out["slow"]["first_over_qps"] == 10
