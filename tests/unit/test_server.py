"""The grpc.aio front door without Ray: auth, error mapping, health, validation before any handle."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from fusionrec.gateway.config import LimitsConfig, ServerConfig
from fusionrec.gateway.pipeline import Recommender
from fusionrec.gateway.server import create_server
from fusionrec.gateway.service import RecommenderServicer


class _Loop(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.loop = asyncio.new_event_loop()

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)


@pytest.fixture(scope="module", params=["", "s3cret"], ids=["open", "token"])
def server(request):
    loop = _Loop()
    loop.start()
    cfg = ServerConfig(port=0, auth_token=request.param)
    # No deployments behind it: every request here must be answered before a handle is needed.
    recommender = Recommender({}, None, None, LimitsConfig(), cfg)
    servicer = RecommenderServicer(recommender, cfg.default_deadline_ms)
    srv, port, health = loop.call(create_server(servicer, cfg))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield request.param, pb_grpc.RecommenderStub(channel), health_pb2_grpc.HealthStub(channel)
    channel.close()
    loop.call(srv.stop(0))
    loop.loop.call_soon_threadsafe(loop.loop.stop)


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
