"""Early shedding without Ray: the estimator's arithmetic on a driven clock, then the real grpc.aio front
door over a servicer with a fixed capacity (one request at a time), saturated with deadlines it cannot meet."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from fusionrec.gateway.admission import DEADLINE_REASON, OBJECTIVE_REASON, LoadEstimator
from fusionrec.gateway.config import ServerConfig
from fusionrec.gateway.metrics import Metrics
from fusionrec.gateway.server import create_server, set_serving
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from loop_support import LoopThread


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _run_alone(est: LoadEstimator, clock: Clock, n: int, latency_s: float) -> None:
    for _ in range(n):
        ticket = est.begin()
        clock.t += latency_s
        est.end(ticket)
        clock.t += 1.0  # idle time between calls is not service time


def test_service_time_counts_busy_time_only_and_nothing_is_shed_before_enough_samples():
    clock = Clock()
    est = LoadEstimator(headroom=1.0, min_samples=8, now=clock)
    _run_alone(est, clock, 8, 0.02)
    assert est.service_time_s() is None  # 8 completions give 7 intervals: not enough yet
    held = [est.begin() for _ in range(5)]
    assert est.verdict(0.001) is None  # no estimate yet: admitted
    clock.t += 0.1
    for t in held:
        est.end(t)  # five requests in 100 ms of busy time
    _run_alone(est, clock, 64, 0.02)  # the window forgets them
    assert est.service_time_s() == pytest.approx(0.02)


def test_parallel_completions_lower_the_service_time_and_the_queue_decides():
    clock = Clock()
    est = LoadEstimator(headroom=1.0, min_samples=4, now=clock)
    for _ in range(10):  # four at a time, each batch taking 40 ms: 10 ms of busy time per request
        tickets = [est.begin() for _ in range(4)]
        clock.t += 0.04
        for t in tickets:
            est.end(t)
    assert est.service_time_s() == pytest.approx(0.01, rel=0.1)
    est._marks.clear()  # exactly 10 ms per request from here on
    est._marks.extend(i * 0.01 for i in range(10))
    assert est.verdict(0.001) is None  # nothing in flight: never shed
    held = [est.begin() for _ in range(9)]
    assert est.verdict(0.2) is None  # 10 x 10 ms fits in 200 ms
    shed = est.verdict(0.05)
    assert shed is not None and shed.reason == DEADLINE_REASON and shed.in_flight == 9
    assert shed.estimate_s == pytest.approx(0.1, rel=0.05) and shed.retry_after_s == pytest.approx(0.09, rel=0.05)
    assert "9 requests in flight" in shed.message() and "retry after 90 ms" in shed.message()
    for t in held:
        est.end(t)


def test_latency_objective_sheds_beyond_a_multiple_of_the_lone_latency():
    clock = Clock()
    est = LoadEstimator(headroom=1.0, latency_factor=2.0, min_samples=4, now=clock)
    _run_alone(est, clock, 10, 0.03)
    assert est.alone_latency_s() == pytest.approx(0.03)
    held = [est.begin()]
    assert est.verdict(10.0) is None  # 2 x 30 ms = the objective itself
    held += [est.begin(), est.begin()]
    shed = est.verdict(10.0)
    assert shed is not None and shed.reason == OBJECTIVE_REASON and "latency objective" in shed.message()


class _OneAtATime(pb_grpc.RecommenderServicer):
    """A backend with a fixed capacity: one Recommend at a time, `service_s` each; counts what reached it."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.calls = 0
        self._lock: asyncio.Lock | None = None

    async def Recommend(self, request, context):
        self.calls += 1
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            await asyncio.sleep(self.service_s)
        return pb.RecommendResponse(model_version="slow")


@contextlib.contextmanager
def _front_door(cfg: ServerConfig, servicer, metrics: Metrics):
    loop = LoopThread()
    loop.start()
    srv, port, health = loop.call(create_server(servicer, cfg, metrics))
    loop.call(set_serving(health, True))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.RecommenderStub(channel)
    finally:
        channel.close()
        loop.call(srv.stop(0))
        loop.loop.call_soon_threadsafe(loop.loop.stop)


def test_saturated_front_door_sheds_what_cannot_meet_its_deadline_and_admitted_calls_succeed():
    servicer = _OneAtATime(service_s=0.05)
    metrics = Metrics()
    with _front_door(ServerConfig(port=0, admission_headroom=0.8), servicer, metrics) as stub:
        for _ in range(12):  # measured service time: ~50 ms per request
            stub.Recommend(pb.RecommendRequest(user_id="u"), timeout=5)
        futures = [stub.Recommend.future(pb.RecommendRequest(user_id="u"), timeout=0.6) for _ in range(40)]
        ok, shed = 0, []
        for f in futures:
            try:
                f.result()
                ok += 1
            except grpc.RpcError as err:
                shed.append(err)
    assert shed and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in shed), \
        {e.code() for e in shed}  # admitted calls all met their deadline: no DEADLINE_EXCEEDED
    assert ok >= 3
    assert "remaining deadline" in shed[0].details() and "retry after" in shed[0].details()
    assert int(dict(shed[0].trailing_metadata())["grpc-retry-pushback-ms"]) > 0
    assert servicer.calls == 12 + ok  # shed calls never reached the backend
    assert metrics.rejected.labels("Recommend", DEADLINE_REASON)._value.get() == len(shed)


def test_shedding_can_be_turned_off():
    servicer = _OneAtATime(service_s=0.02)
    with _front_door(ServerConfig(port=0, admission_enabled=False), servicer, Metrics()) as stub:
        for _ in range(12):
            stub.Recommend(pb.RecommendRequest(user_id="u"), timeout=5)
        futures = [stub.Recommend.future(pb.RecommendRequest(user_id="u"), timeout=0.1) for _ in range(20)]
        codes = set()
        for f in futures:
            try:
                f.result()
                codes.add(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.add(err.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED not in codes and grpc.StatusCode.DEADLINE_EXCEEDED in codes
