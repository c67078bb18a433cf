"""Prometheus metrics of the front door: the families, the RPC interceptor, the /metrics endpoint.

Everything lives in a private CollectorRegistry (Ray keeps its own metrics elsewhere), served by one
HTTP endpoint from the Gateway replica. Values that live in other replicas (encoder batches, store
size, progress of re-indexes and encoder swaps) come from gateway/metrics_cluster.py's collector,
registered into the same registry. Plain prometheus_client and grpc: no Ray here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Mapping
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fusionrec.gateway.requestlog import final_code

log = logging.getLogger("ray.serve")  # lands in the replica log files

PREFIX = "fusionrec_"
#: Our own service's methods are labelled by name alone ("Recommend"); others keep "Service/Method".
_OWN_SERVICE = "/fusionrec.v1.Recommender/"
RPC_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: How a dropped query modality's reason text (gateway/pipeline.py) maps to a bounded label.
DROP_REASONS = (("deadline", "deadline"), ("encoder error", "encoder_error"), ("unavailable", "unavailable"),
                ("overloaded", "overloaded"))


def method_label(full_method: str) -> str:
    """"/fusionrec.v1.Recommender/Recommend" -> "Recommend"; other services keep "Service/Method"."""
    if full_method.startswith(_OWN_SERVICE):
        return full_method[len(_OWN_SERVICE):]
    return full_method.lstrip("/")


def drop_reason(why: str) -> str:
    """A bounded label for a dropped modality's reason text (which carries numbers)."""
    for prefix, label in DROP_REASONS:
        if why.startswith(prefix):
            return label
    return "other"


class Metrics:
    """The front door's own families (RPCs, stages, rejections, degraded answers) in a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rpc_requests = Counter(
            PREFIX + "rpc_requests", "Finished unary RPCs by method and gRPC status code (rejected ones included).",
            ["method", "code"], registry=r)
        self.rpc_duration = Histogram(
            PREFIX + "rpc_duration_seconds", "Server-side latency of unary RPCs, from the first interceptor on.",
            ["method"], buckets=RPC_BUCKETS_S, registry=r)
        self.stage_duration = Histogram(
            PREFIX + "stage_duration_seconds", "Latency of one stage of an RPC (encode_<modality>: one modality's "
            "encoder call; encode: all of them; retrieve_and_rank; fuse; store).", ["method", "stage"],
            buckets=STAGE_BUCKETS_S, registry=r)
        self.rejected = Counter(
            PREFIX + "rejected_requests", "Requests refused or shed, by reason: unauthenticated, starting_up, "
            "inflight_limit, stream_limit, backpressure, out_of_resources, deadline_unreachable and latency_objective "
            "(shed early by the admission estimate, gateway/admission.py), latency_objective_queued "
            "(admitted, then dropped from the queue once a surge was seen).",
            ["method", "reason"], registry=r)
        self.degraded = Counter(
            PREFIX + "degraded_responses", "Recommend answers with at least one query modality dropped.",
            registry=r)
        self.dropped = Counter(
            PREFIX + "modalities_dropped", "Query modalities dropped from Recommend answers, by reason: deadline, "
            "encoder_error, unavailable (no live encoder replica), overloaded (its queue full), other.",
            ["modality", "reason"], registry=r)
        self.inflight = Gauge(PREFIX + "inflight_requests", "API RPCs running now (the admission limit's count).",
                              registry=r)

    # ---- called by the interceptors and the pipeline

    def reject(self, full_method: str, reason: str) -> None:
        self.rejected.labels(method_label(full_method), reason).inc()

    def observe_rpc(self, full_method: str, code: grpc.StatusCode, seconds: float) -> None:
        method = method_label(full_method)
        self.rpc_requests.labels(method, code.name).inc()
        self.rpc_duration.labels(method).observe(seconds)

    def observe_stage(self, method: str, stage: str, seconds: float) -> None:
        self.stage_duration.labels(method, stage).observe(seconds)

    def observe_stages(self, method: str, stages_ms: Mapping[str, float]) -> None:
        for stage, ms in stages_ms.items():
            self.observe_stage(method, stage, ms / 1000)

    def observe_dropped(self, dropped: Mapping[str, str]) -> None:
        """One Recommend's dropped modalities (modality -> reason text); counts a degraded answer."""
        if not dropped:
            return
        self.degraded.inc()
        for modality, why in dropped.items():
            self.dropped.labels(modality, drop_reason(why)).inc()

    def track_inflight(self, read: Callable[[], float]) -> None:
        self.inflight.set_function(read)

    def interceptor(self) -> "MetricsInterceptor":
        return MetricsInterceptor(self)


class NoMetrics:
    """What the pipeline calls when metrics are off: nothing happens."""

    def observe_stage(self, method: str, stage: str, seconds: float) -> None: ...

    def observe_stages(self, method: str, stages_ms: Mapping[str, float]) -> None: ...

    def observe_dropped(self, dropped: Mapping[str, str]) -> None: ...


NO_METRICS = NoMetrics()


async def timed(metrics: Metrics | NoMetrics, method: str, stage: str, call: Awaitable[Any]) -> Any:
    """Await ``call``, observing its wall time as ``stage`` of ``method`` (also when it fails)."""
    t0 = time.perf_counter()
    try:
        return await call
    finally:
        metrics.observe_stage(method, stage, time.perf_counter() - t0)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every unary RPC with its final status code. Outermost, so that refusals of the
    other interceptors (auth, admission) and the error mapping's codes are all seen; methods without a
    handler (UNIMPLEMENTED) are not counted, so callers cannot mint label values."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method, metrics = handler.unary_unary, details.method, self._metrics

        async def measured(request, context):
            t0 = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                reply = await inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                return reply
            except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
                code = final_code(context, exc)
                raise
            finally:
                metrics.observe_rpc(method, code, time.perf_counter() - t0)

        return grpc.unary_unary_rpc_method_handler(
            measured, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class MetricsEndpoint:
    """`GET /metrics` in Prometheus' text format, from a daemon thread (prometheus_client's WSGI server)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int, span: int = 1) -> MetricsEndpoint | None:
    """Start the endpoint on the first free port of port .. port + span - 1 (one per Gateway replica on a
    machine: each replica's counters on a target of their own, never alternating on one); None (logged)
    when none can be bound: serving RPCs matters more than exposing metrics, so taken metrics ports never
    keep the Gateway from starting."""
    err: OSError | None = None
    for candidate in [port] if port == 0 else range(port, min(port + span, 65536)):
        try:
            endpoint = MetricsEndpoint(registry, host, candidate)
        except OSError as exc:
            err = exc
            continue
        log.info("fusionrec metrics on http://%s:%d/metrics", host, endpoint.port)
        return endpoint
    log.error("metrics endpoint not started: cannot bind %s:%d (+%d) (%s); set server.metrics_port", host, port,
              span - 1, err)
    return None
