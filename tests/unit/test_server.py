"""The grpc.aio front door without Ray: auth, error mapping, health, validation before any handle."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.exceptions import (ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError,
                            RayTaskError)
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                                  RequestCancelledError)

from fusionrec.core.errors import DeadlineExceeded, InvalidArgument, NotFound
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from fusionrec.gateway.config import LimitsConfig, ServerConfig
from fusionrec.gateway.pipeline import Recommender
from fusionrec.gateway.errors import status_of, to_status
from fusionrec.gateway.server import SERVICE_NAME, create_server
from fusionrec.gateway.service import RecommenderServicer
from loop_support import LoopThread


@contextlib.contextmanager
def _serving(cfg: ServerConfig, servicer=None, started: bool = True):
    """A front door on its own loop; `started` marks start-up complete with health left NOT_SERVING.
    Default servicer: no deployments behind it, so a request must be answered before a handle is needed."""
    loop = LoopThread()
    loop.start()
    if servicer is None:
        servicer = RecommenderServicer(Recommender({}, None, None, LimitsConfig(), cfg), cfg.default_deadline_ms)
    srv, port, health = loop.call(create_server(servicer, cfg))
    health.started = started
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.RecommenderStub(channel), health_pb2_grpc.HealthStub(channel), channel
    finally:
        channel.close()
        loop.call(srv.stop(0))
        loop.loop.call_soon_threadsafe(loop.loop.stop)


@pytest.fixture(scope="module", params=["", "s3cret"], ids=["open", "token"])
def server(request):
    with _serving(ServerConfig(port=0, auth_token=request.param)) as (stub, health, _):
        yield request.param, stub, health


def _meta(token):
    return (("authorization", f"Bearer {token}"),) if token else ()


def test_health_is_open_and_not_serving_before_load(server):
    _, _, health = server
    reply = health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_token_is_required_when_configured(server):
    token, stub, _ = server
    if not token:
        pytest.skip("open server")
    for meta in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as info:
            stub.Recommend(pb.RecommendRequest(user_id="u"), metadata=meta)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in info.value.details()


@pytest.mark.parametrize("request_, fragment", [
    (pb.RecommendRequest(user_id="u", k=501), "k must be between 1 and 500"),
    (pb.RecommendRequest(), "send a user_id"),
    (pb.RecommendRequest(user_id="u", filters=[pb.Filter(attribute="a b", equals=pb.AttributeValue(number_value=1))]),
     "not a valid attribute name"),
    (pb.RecommendRequest(user_id="u", filters=[pb.Filter(attribute="year")]), "exactly one of"),
    (pb.RecommendRequest(user_id="u" * 300), "limit is 256"),
])
def test_invalid_recommend_requests(server, request_, fragment):
    token, stub, _ = server
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(request_, metadata=_meta(token))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_empty_upsert_and_interactions_are_invalid(server):
    token, stub, _ = server
    for call, req in ((stub.UpsertItems, pb.UpsertItemsRequest()),
                      (stub.RecordInteractions, pb.RecordInteractionsRequest()),
                      (stub.DeleteItems, pb.DeleteItemsRequest())):
        with pytest.raises(grpc.RpcError) as info:
            call(req, metadata=_meta(token))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unexpected_errors_become_internal_without_leaking(server):
    token, stub, _ = server
    # A valid request reaches the missing handles: the AttributeError must surface as INTERNAL.
    with pytest.raises(grpc.RpcError) as info:
        stub.GetItem(pb.GetItemRequest(item_id="x"), metadata=_meta(token))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "AttributeError" in info.value.details() and "Traceback" not in info.value.details()
    # ...and the server still answers afterwards.
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(pb.RecommendRequest(), metadata=_meta(token))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- Admission: start-up gate, the API's in-flight limit, health and reflection outside it ----

def test_api_rpcs_before_start_up_are_unavailable_while_health_answers():
    with _serving(ServerConfig(port=0), started=False) as (stub, health, _):
        with pytest.raises(grpc.RpcError) as info:
            stub.Recommend(pb.RecommendRequest())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "starting up" in info.value.details() and "retry" in info.value.details()
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_watch_streams_take_no_api_slot_and_have_their_own_cap():
    with _serving(ServerConfig(port=0, max_inflight_requests=1)) as (stub, health, _):
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(ServerConfig().max_open_streams)]
        try:
            for watch in watches:  # each one open: its first status arrived
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            extra = health.Watch(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.RpcError) as info:
                next(extra)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"limit {ServerConfig().max_open_streams}" in info.value.details()
            # The API's only slot is free: the request gets past the limiter to validation.
            with pytest.raises(grpc.RpcError) as info:
                stub.Recommend(pb.RecommendRequest())
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            for watch in watches:
                watch.cancel()
        # Closed streams give their places back.
        again = health.Watch(health_pb2.HealthCheckRequest())
        assert _first_status_within(again, 5) == health_pb2.HealthCheckResponse.NOT_SERVING
        again.cancel()


def _first_status_within(watch, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:  # the server counts a cancelled stream down shortly after the client cancels it
        try:
            return next(watch).status
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


class _Blocking(pb_grpc.RecommenderServicer):
    """GetItem "hold" waits for `release`; GetItem "busy" raises Serve's real back-pressure error."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    async def GetItem(self, request, context):
        if request.item_id == "busy":
            raise BackPressureError(num_queued_requests=8, max_queued_requests=8)
        self.entered.set()
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        return pb.Item(item_id=request.item_id)


def test_the_api_limit_answers_resource_exhausted_with_retry_advice():
    servicer = _Blocking()
    with _serving(ServerConfig(port=0, max_inflight_requests=1), servicer) as (stub, health, _):
        held = stub.GetItem.future(pb.GetItemRequest(item_id="hold"))
        assert servicer.entered.wait(10)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetItem(pb.GetItemRequest(item_id="x"))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 1" in info.value.details() and "retry after" in info.value.details()
        assert dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"] == "100"
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        servicer.release.set()
        assert held.result(timeout=10).item_id == "hold"
        # Serve's back-pressure from a handle: RESOURCE_EXHAUSTED, advice in the message and the trailer.
        with pytest.raises(grpc.RpcError) as info:
            stub.GetItem(pb.GetItemRequest(item_id="busy"))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after 500 ms" in info.value.details()
        assert dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"] == "500"


# ---- Ray failures: the right status and retry advice (real Ray exception instances) ----

def _task_error(cause: BaseException) -> RayTaskError:
    return RayTaskError("Retrieval.recommend", "Traceback ...", cause, proctitle="ray::x", pid=1, ip="127.0.0.1")


_RESTARTING = (grpc.StatusCode.UNAVAILABLE, "restarting")


@pytest.mark.parametrize("exc, expected", [
    (RayActorError(), _RESTARTING),
    (ActorDiedError(), _RESTARTING),
    (ActorUnavailableError("connection lost", None), _RESTARTING),
    (DeploymentUnavailableError(DeploymentID(name="Retrieval", app_name="default")), _RESTARTING),
    (ReplicaUnavailableError("abc"), _RESTARTING),
    (_task_error(ActorDiedError()), _RESTARTING),  # a replica behind a replica died
    (BackPressureError(num_queued_requests=4, max_queued_requests=4), (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                        "retry after 500 ms")),
    (BackPressureError(4, 4, retry_after_s=2.0), (grpc.StatusCode.RESOURCE_EXHAUSTED, "retry after 2000 ms")),
    (pickle.loads(pickle.dumps(_task_error(BackPressureError(4, 4)))), (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                        "max_queued_requests=4")),
    (RequestCancelledError("r1"), (grpc.StatusCode.CANCELLED, "cancelled")),
    (_task_error(InvalidArgument("k must be positive")), (grpc.StatusCode.INVALID_ARGUMENT, "k must be positive")),
    (_task_error(InvalidArgument("bad")).as_instanceof_cause(), (grpc.StatusCode.INVALID_ARGUMENT, "bad")),
    (_task_error(_task_error(NotFound("no item x"))), (grpc.StatusCode.NOT_FOUND, "no item x")),
    (_task_error(RuntimeError("boom")), (grpc.StatusCode.INTERNAL, "RuntimeError")),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None)
def test_ray_failures_map_to_status_with_retry_advice(exc, expected):
    code, fragment = expected
    status = status_of(exc)
    assert status.code == code and fragment in status.message, status
    assert to_status(exc) == (status.code, status.message)


@pytest.mark.parametrize("exc", [GetTimeoutError("get timed out"), asyncio.TimeoutError(), TimeoutError()])
def test_handle_timeouts_depend_on_the_callers_deadline(exc):
    # A server-side cap ran out while the caller still had time (or set none): the replica is slow, retry.
    for remaining in (None, 2.5):
        code, message = to_status(exc, remaining)
        assert code == grpc.StatusCode.UNAVAILABLE and "retry" in message
    # The caller's own deadline is spent.
    assert to_status(exc, 0.0)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    # A domain DeadlineExceeded (a TimeoutError too) keeps its own mapping and message.
    assert to_status(DeadlineExceeded("deadline exceeded before retrieval"), 3.0) == (
        grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before retrieval")


def test_errors_module_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None; import fusionrec.gateway.errors as e, grpc;"
            "assert e.to_status(TimeoutError())[0] == grpc.StatusCode.UNAVAILABLE;"
            "assert e.to_status(RuntimeError())[0] == grpc.StatusCode.INTERNAL")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reflection_streams_pass_the_cap_wrapper():
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with _serving(ServerConfig(port=0)) as (_, _, channel):
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


class _Stuck(Recommender):
    """A Recommender whose store never answers (a stuck or restarting replica)."""

    def __init__(self) -> None:
        super().__init__({}, None, None, LimitsConfig(), ServerConfig())

    async def get(self, item_id: str):
        await asyncio.sleep(3600)

    async def delete(self, item_ids: list[str]):
        await asyncio.sleep(3600)


def test_every_rpc_runs_under_a_deadline_even_without_one_from_the_caller():
    cfg = ServerConfig(port=0)
    servicer = RecommenderServicer(_Stuck(), cfg.default_deadline_ms, max_call_ms=300)
    with _serving(cfg, servicer) as (stub, _, _):
        with pytest.raises(grpc.RpcError) as info:  # no deadline from the caller: the server's cap
            stub.GetItem(pb.GetItemRequest(item_id="a"))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "GetItem did not finish within 300 ms" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # a shorter caller deadline wins
            stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["a"]), timeout=0.1)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
