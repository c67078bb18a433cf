"""One RPC = one connected trace, through the real front door and pipeline over the in-process app
(local_app_support.py): root server span, stage spans under it, request id on the root; OTLP export
to a real collector endpoint when configured."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fusionrec.gateway.config import ServerConfig
from fusionrec.gateway.tracing import SERVICE_NAME, Tracing
from fusionrec.v1 import recommender_pb2 as pb

from local_app_support import LocalApp

RECOMMEND = "fusionrec.v1.Recommender/Recommend"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    local = LocalApp(tmp_path_factory.mktemp("tracing"))
    yield local
    local.close()


@pytest.fixture(scope="module")
def traced(app):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with app.serving(ServerConfig(), tracing=Tracing(provider)) as stub:
        app.load_items(stub)
        yield stub, exporter


def _spans(exporter, call):
    """The spans finished by ``call()`` (the root ends before the answer is sent)."""
    exporter.clear()
    result = call()
    return result, list(exporter.get_finished_spans())


def _root(spans):
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [s.name for s in spans]
    return roots[0]


def test_one_recommend_is_one_connected_trace(traced):
    stub, exporter = traced
    request = pb.RecommendRequest(user_id="u-trace", query=pb.Content(text="a cat on a sofa"), k=3)
    response, spans = _spans(exporter, lambda: stub.Recommend(request, metadata=(("x-request-id", "trace-1"),)))
    root = _root(spans)
    assert root.name == RECOMMEND and root.kind == SpanKind.SERVER
    assert root.attributes["request_id"] == "trace-1" == response.request_id
    assert root.attributes["rpc.method"] == "Recommend" and root.attributes["rpc.grpc.status_code"] == 0
    assert root.attributes["fusionrec.results"] == 3 and root.attributes["fusionrec.degraded"] is False
    children = {s.name: s for s in spans if s is not root}
    assert set(children) == {"encode.text", "retrieve_and_rank"}
    for child in children.values():
        assert child.context.trace_id == root.context.trace_id
        assert child.parent.span_id == root.context.span_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    # The encoder ran before retrieval, which used its vector.
    assert children["encode.text"].end_time <= children["retrieve_and_rank"].start_time


def test_each_rpc_has_its_own_trace(traced):
    stub, exporter = traced
    request = pb.RecommendRequest(user_id="u-trace", k=2)
    _, first = _spans(exporter, lambda: stub.Recommend(request))
    _, second = _spans(exporter, lambda: stub.Recommend(request))
    assert {s.context.trace_id for s in first} != {s.context.trace_id for s in second}
    assert len({s.context.trace_id for s in first}) == 1
    assert _root(first).attributes["request_id"] != _root(second).attributes["request_id"]


def test_a_callers_traceparent_makes_the_root_its_child(traced):
    stub, exporter = traced
    trace_hex, parent_hex = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    metadata = (("traceparent", f"00-{trace_hex}-{parent_hex}-01"),)
    request = pb.RecommendRequest(user_id="u-trace", k=2)
    _, spans = _spans(exporter, lambda: stub.Recommend(request, metadata=metadata))
    root = next(s for s in spans if s.name == RECOMMEND)
    assert root.parent.span_id == int(parent_hex, 16) and root.parent.is_remote
    assert {s.context.trace_id for s in spans} == {int(trace_hex, 16)}


def test_upsert_traces_encode_fuse_and_store(traced):
    stub, exporter = traced
    item = pb.ItemInput(item_id="item-traced", content=pb.Content(text="a red motorcycle on a mountain road"))
    _, spans = _spans(exporter, lambda: stub.UpsertItems(pb.UpsertItemsRequest(items=[item])))
    root = _root(spans)
    assert root.name == "fusionrec.v1.Recommender/UpsertItems" and root.attributes["fusionrec.upserted"] == 1
    stages = sorted((s for s in spans if s is not root), key=lambda s: s.start_time)
    assert [s.name for s in stages] == ["encode", "fuse", "store"]
    assert all(s.parent.span_id == root.context.span_id for s in stages)


def test_a_refused_rpc_is_traced_with_its_code(traced):
    stub, exporter = traced
    with pytest.raises(grpc.RpcError) as info:
        _spans(exporter, lambda: stub.Recommend(pb.RecommendRequest(user_id="u", k=100_000),
                                                metadata=(("x-request-id", "bad-k"),)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # An aborted RPC's status reaches the caller before the server's handler unwinds and ends the span.
    deadline = time.monotonic() + 10
    while not exporter.get_finished_spans() and time.monotonic() < deadline:
        time.sleep(0.05)
    (root,) = exporter.get_finished_spans()  # refused before any stage
    assert root.attributes["request_id"] == "bad-k"
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert root.status.status_code == StatusCode.UNSET  # the caller's mistake, not a server fault


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: what an OpenTelemetry collector would get."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.received = threading.Event()

    def Export(self, request, context):
        self.requests.append(request)
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_endpoint_exports_the_trace(app):
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        tracing = Tracing.from_config(ServerConfig(otlp_endpoint=f"http://127.0.0.1:{port}"))
        with app.serving(ServerConfig(), tracing=tracing) as stub:
            stub.Recommend(pb.RecommendRequest(user_id="u-otlp", query=pb.Content(text="a horse"), k=2),
                           metadata=(("x-request-id", "otlp-1"),))
        tracing.shutdown()  # flushes the batch
        assert collector.received.wait(30)
    finally:
        server.stop(0)
    resource_spans = [rs for r in collector.requests for rs in r.resource_spans]
    services = {a.value.string_value for rs in resource_spans for a in rs.resource.attributes
                if a.key == "service.name"}
    spans = [s for rs in resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert services == {SERVICE_NAME}
    assert {s.name for s in spans} == {RECOMMEND, "encode.text", "retrieve_and_rank"}
    root = next(s for s in spans if s.name == RECOMMEND)
    assert {a.key: a.value.string_value for a in root.attributes}["request_id"] == "otlp-1"
    assert {s.trace_id for s in spans} == {root.trace_id}


def test_without_an_endpoint_spans_cost_nothing_and_record_nothing():
    tracing = Tracing.from_config(ServerConfig())
    with tracing.rpc_span("svc", "M", (), "rid") as span:
        assert not span.is_recording()
    tracing.shutdown()  # not ours to shut: a no-op
