"""Early shedding without Ray: the estimator's arithmetic on a driven clock, then the real grpc.aio front
door over a servicer with a fixed capacity (one request at a time), saturated with deadlines it cannot meet."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from fusionrec.gateway.admission import DEADLINE_REASON, OBJECTIVE_REASON, QUEUED_REASON, LoadEstimator
from fusionrec.gateway.config import ServerConfig
from fusionrec.gateway.metrics import Metrics
from fusionrec.gateway.server import create_server, set_serving
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from grpc_support import settle
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


def _offer(est: LoadEstimator, clock: Clock, n: int, every_s: float) -> None:
    """``n`` requests offered ``every_s`` apart, all shed or admitted but never finished (an open-loop surge)."""
    for _ in range(n):
        clock.t += every_s
        est.verdict(10.0)


def test_latency_objective_sheds_beyond_a_multiple_of_the_lone_latency_only_while_overloaded():
    clock = Clock()
    est = LoadEstimator(headroom=1.0, latency_factor=2.0, min_samples=4, now=clock)
    _run_alone(est, clock, 10, 0.03)
    assert est.alone_latency_s() == pytest.approx(0.03)
    assert est.service_time_s() == pytest.approx(0.03)  # capacity: 33 requests/s
    held = [est.begin() for _ in range(3)]
    clock.t += 2.5  # the lone requests left the 2 s rate window: nothing offered lately
    shed = est.verdict(10.0)
    assert shed is None  # 4 x 30 ms is beyond 2 x 30 ms, but 1 request in 2 s is no overload
    _offer(est, clock, 80, 0.02)  # 50 requests/s offered against 33/s of capacity
    assert est.offered_qps() == pytest.approx(50, abs=1)  # over the 1.6 s since the pause, not the 2 s window
    assert est.overloaded()
    shed = est.verdict(10.0)
    assert shed is not None and shed.reason == OBJECTIVE_REASON and "latency objective" in shed.message()
    assert shed.bound_s == pytest.approx(0.06) and shed.estimate_s == pytest.approx(0.12)
    for t in held:
        est.end(t)
    est.latency_factor = 1.5  # 2 x 30 ms is beyond 1.5 x 30 ms, but the objective keeps 2 requests in flight
    held = [est.begin()]
    assert est.overloaded() and est.verdict(10.0) is None
    est.end(held[0])


def test_a_surge_after_an_idle_pause_has_its_queue_cut_back_once_it_is_seen():
    """Lone requests of 20 ms, an idle pause, then 200 requests/s against 50/s of capacity (one at a time): the
    2 s rate window admits a queue before it sees the surge. The first request the objective sheds drops the
    requests admitted last beyond its concurrency: they end without counting as completions."""
    clock = Clock()
    est = LoadEstimator(headroom=1.0, latency_factor=1.5, min_samples=4, now=clock)
    _run_alone(est, clock, 10, 0.02)
    clock.t += 5.0  # idle
    queue, shed = [], None
    for i in range(400):
        clock.t += 0.005
        if i % 4 == 3 and queue:  # the backend answers one every 20 ms
            est.end(queue.pop(0))
        shed = est.verdict(10.0)
        if shed is not None:
            break
        queue.append(est.begin())
    assert shed is not None and shed.reason == OBJECTIVE_REASON
    assert len(queue) > 2 + 8  # what the window let in before it saw the surge
    completed = len(est._completions)
    dropped = est.excess()
    keep = max(2, int(1.5 * est.alone_latency_s() / est.service_time_s()))
    assert dropped == queue[keep:] and all(t.dropped for t in dropped) and not any(t.dropped for t in queue[:keep])
    assert est.excess() == []  # already dropped: nothing more beyond the objective
    told = est.dropped(dropped[-1])
    assert told.reason == QUEUED_REASON and "dropped from the queue after" in told.message()
    for t in dropped:
        est.end(t)
    assert est.in_flight == keep and len(est._completions) == completed  # cancelled work completed nothing


def test_a_queue_within_a_few_requests_of_the_objective_is_left_alone():
    clock = Clock()
    est = LoadEstimator(headroom=1.0, latency_factor=1.5, min_samples=4, now=clock)
    _run_alone(est, clock, 10, 0.02)
    held = [est.begin() for _ in range(2 + 8)]  # the objective keeps 2 (1.5 x 20 / 20 ms, floor 2); 8 more: a step
    assert est.excess() == [] and not any(t.dropped for t in held)
    held.append(est.begin())
    assert est.excess() == held[2:]


def test_a_stall_behind_the_front_door_at_light_load_is_not_taken_for_overload():
    """60 requests/s against a backend serving one at a time in 5 ms (30 % of its capacity), then 1.5 s in
    which each takes 80 ms (a stall, as while a swap re-fits the fusion model): the queue grows and the recent
    service time with it, so the offered rate times that reads as overload, but the capacity seen lately
    says 30 %: the objective sheds nothing (only the deadline bounds the queue)."""
    clock = Clock()
    est = LoadEstimator(headroom=1.0, latency_factor=1.5, min_samples=4, now=clock)
    _run_alone(est, clock, 10, 0.005)
    queue: list = []
    next_arrival, busy_until, most = clock.t, None, 0.0
    stall = (clock.t + 10.0, clock.t + 11.5)
    while clock.t < stall[1] + 3.0:
        if busy_until is not None and busy_until <= next_arrival:
            clock.t = busy_until
            est.end(queue.pop(0))
            busy_until = None
        else:
            clock.t = next_arrival
            next_arrival += 1 / 60
            assert est.verdict(10.0) is None, (len(queue), est.service_time_s(), est.best_service_time_s())
            queue.append(est.begin())
        if busy_until is None and queue:
            busy_until = clock.t + (0.08 if stall[0] <= clock.t < stall[1] else 0.005)
        most = max(most, est.offered_qps() * est.service_time_s())
    assert most > 1.2  # the recent service time alone would have read overload
    assert est.best_service_time_s() == pytest.approx(0.005, rel=0.2)


@pytest.mark.parametrize("callers", [6, 8])
def test_callers_that_wait_for_their_answers_are_never_shed_by_the_objective(callers):
    """Closed-loop callers, starting together after a pause, on a server that serves one request at a time:
    each waits `callers` x the lone latency, far beyond the objective, but they offer no more than the
    capacity (what Serve's autoscaling must see queued), so only the deadline could shed them. (More than
    `OVERLOAD_STEP` starting together read as a surge at first, as an open loop would: gateway/admission.py.)"""
    clock = Clock()
    est = LoadEstimator(headroom=1.0, latency_factor=2.0, min_samples=4, now=clock)
    _run_alone(est, clock, 10, 0.03)
    clock.t += 5.0
    queue = []
    for _ in range(callers):  # all start at once
        assert est.verdict(10.0) is None
        queue.append(est.begin())
    for _ in range(400):  # 12 s: the head finishes every 30 ms and its caller sends the next at once
        clock.t += 0.03
        est.end(queue.pop(0))
        assert est.verdict(10.0) is None, (est.offered_qps(), est.service_time_s())
        queue.append(est.begin())
    assert est.service_time_s() == pytest.approx(0.03)
    assert est.offered_qps() * est.service_time_s() == pytest.approx(1.0, abs=0.05)


def test_callers_moving_over_from_a_lost_replica_are_not_taken_for_overload():
    """Three Gateway replicas share a backend: this one measures a third of its capacity (one answer per
    90 ms for its 2 callers). The two others die and their 4 callers move here at once, each with one
    retried attempt: 6 callers, answers every 30 ms.
    The capacity estimate still says 60 ms for a while (so the rate alone looks like 2x overload), but the
    answers come back as fast as the calls arrive: nobody is shed."""
    clock = Clock()
    est = LoadEstimator(headroom=1.0, latency_factor=2.0, min_samples=4, now=clock)
    _run_alone(est, clock, 10, 0.03)
    queue = [est.begin() for _ in range(2)]

    def closed_loop(steps: int, every_s: float) -> float:
        """The largest offered rate x service time seen."""
        most = 0.0
        for _ in range(steps):
            clock.t += every_s
            est.end(queue.pop(0))
            assert est.verdict(10.0) is None, (est.offered_qps(), est.completed_qps(), est.service_time_s())
            most = max(most, est.offered_qps() * est.service_time_s())
            queue.append(est.begin())
        return most

    closed_loop(200, 0.09)
    assert est.service_time_s() == pytest.approx(0.09)
    for _ in range(4):  # the other replicas' callers arrive together, after a retried attempt each
        assert est.verdict(10.0) is None
        assert est.verdict(10.0) is None
        queue.append(est.begin())
    assert closed_loop(400, 0.03) > 1.5  # what the rate alone would have called overload
    assert est.service_time_s() == pytest.approx(0.03)


class _OneAtATime(pb_grpc.RecommenderServicer):
    """A backend with a fixed capacity: one Recommend at a time, `service_s` each; counts what reached it."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.calls = 0
        self._lock: asyncio.Lock | None = None

        self.waiting = 0  # calls that reached the backend and have not finished
        self.max_waiting = 0
        self.cancelled = 0  # calls whose work was cancelled before it finished

    async def Recommend(self, request, context):
        self.calls += 1
        self.waiting += 1
        self.max_waiting = max(self.max_waiting, self.waiting)
        self._lock = self._lock or asyncio.Lock()
        try:
            async with self._lock:
                await asyncio.sleep(self.service_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.waiting -= 1
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
    # The deadline rule alone (the latency objective, which would shed earlier, has its own test).
    with _front_door(ServerConfig(port=0, admission_headroom=0.8, admission_latency_factor=0), servicer,
                     metrics) as stub:
        for _ in range(12):  # measured service time: ~50 ms per request
            stub.Recommend(pb.RecommendRequest(user_id="u"), timeout=5)
        ok, shed = settle([stub.Recommend.future(pb.RecommendRequest(user_id="u"), timeout=0.6) for _ in range(40)])
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


def _codes(futures) -> collections.Counter:
    ok, errors = settle(futures)
    codes = collections.Counter(err.code().name for err in errors)
    if ok:
        codes["OK"] = ok
    return codes


@contextlib.contextmanager
def _objective_front_door(factor: float):
    """The front door with the latency objective at ``factor`` over a backend serving one 20 ms request at a
    time (capacity 50/s), after 12 lone requests (the objective's baseline): (stub, servicer, metrics)."""
    servicer, metrics = _OneAtATime(service_s=0.02), Metrics()
    with _front_door(ServerConfig(port=0, admission_latency_factor=factor), servicer, metrics) as stub:
        for _ in range(12):
            stub.Recommend(pb.RecommendRequest(user_id="u"), timeout=5)
        yield stub, servicer, metrics


def test_objective_lets_waiting_callers_queue_and_cuts_an_open_loop_surge_to_a_short_queue():
    """The objective at factor 2 (off by default), one request at a time of 20 ms behind the front door (capacity 50/s). Six callers that wait for
    their answers queue six deep and are all admitted; then requests sent on a schedule at three times the
    capacity: once the surge is seen (within the 2 s rate window) the backend's queue stays a few requests
    deep instead of growing to what the 5 s deadline would allow, the rest shed by the latency objective."""
    request = pb.RecommendRequest(user_id="u")
    with _objective_front_door(2.0) as (stub, servicer, metrics):

        def caller() -> collections.Counter:
            return _codes(stub.Recommend.future(request, timeout=5) for _ in range(40))

        with ThreadPoolExecutor(6) as pool:
            closed = sum((f.result() for f in [pool.submit(caller) for _ in range(6)]), collections.Counter())
        assert closed == {"OK": 240} and servicer.max_waiting == 6
        futures, t0 = [], time.monotonic()
        for i in range(600):  # 150/s for 4 s
            time.sleep(max(t0 + i / 150 - time.monotonic(), 0))
            if i == 450:
                servicer.max_waiting = servicer.waiting  # the last second: long after the surge was seen
            futures.append(stub.Recommend.future(request, timeout=5))
        surge = _codes(futures)
    assert set(surge) == {"OK", "RESOURCE_EXHAUSTED"}, surge
    assert metrics.rejected.labels("Recommend", OBJECTIVE_REASON)._value.get() > 0
    assert servicer.max_waiting <= 8, servicer.max_waiting  # deadline rule alone: ~200 (5 s x 0.8 / 20 ms)


def test_a_surge_after_an_idle_pause_gets_the_queue_it_built_dropped_and_told_so():
    """Lone requests, a pause, then three times the capacity at once: until the offered rate shows the surge
    the deadline alone bounds the queue; the first request shed by the objective drops the requests admitted
    last beyond its concurrency. Their work is cancelled at the backend and they are answered
    RESOURCE_EXHAUSTED with retry advice; the rest of the surge is answered or shed as before."""
    request = pb.RecommendRequest(user_id="u")
    with _objective_front_door(1.5) as (stub, servicer, metrics):
        time.sleep(2.5)  # the rate window empties
        futures, t0 = [], time.monotonic()
        for i in range(450):  # 150/s for 3 s
            time.sleep(max(t0 + i / 150 - time.monotonic(), 0))
            futures.append(stub.Recommend.future(request, timeout=5))
        ok, errors = settle(futures)
    dropped = [e for e in errors if "dropped from the queue" in e.details()]
    assert dropped and ok > 0, (ok, collections.Counter(e.code().name for e in errors))
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors), {e.code() for e in errors}
    assert all(int(dict(e.trailing_metadata())["grpc-retry-pushback-ms"]) > 0 for e in dropped)
    assert metrics.rejected.labels("Recommend", QUEUED_REASON)._value.get() == len(dropped)
    # Each reached the backend (admitted) and had its work cancelled there.
    assert servicer.cancelled == len(dropped) and servicer.calls == 12 + ok + len(dropped)
