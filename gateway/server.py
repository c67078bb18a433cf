"""The grpc.aio front door: servicer + standard health + reflection + auth and error interceptors."""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from fusionrec.gateway.admission import OBJECTIVE_REASON, Admission, LoadEstimator, Shed, Ticket
from fusionrec.gateway.config import ServerConfig
from fusionrec.gateway.errors import status_of
from fusionrec.gateway.requestlog import RequestLogInterceptor, current_request_id
from fusionrec.gateway.tracing import Tracing

if TYPE_CHECKING:
    from fusionrec.gateway.metrics import Metrics

# Serve routes "ray.serve" records into the replica log files (logs/serve/replica_*.log).
log = logging.getLogger("ray.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
# Probes and discovery stay open so orchestrators and grpcurl work without a token, and outside the
# API's in-flight limit (their long-lived streams have a cap of their own: see AdmissionInterceptor).
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
#: Retry advice with RESOURCE_EXHAUSTED from the in-flight limit.
LIMIT_RETRY_AFTER_MS = 100
#: Told (full method, reason) when a request is refused or shed: the metrics' rejection counter.
Reject = Callable[[str, str], None]


def _no_reject(_method: str, _reason: str) -> None:
    pass


def _wrap_unary(handler: grpc.RpcMethodHandler,
                behaviour: Callable[[Callable, object, grpc.aio.ServicerContext], Awaitable]) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary

    async def wrapped(request, context):
        return await behaviour(inner, request, context)

    return grpc.unary_unary_rpc_method_handler(
        wrapped, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a handler to their gRPC status (see fusionrec.gateway.errors.to_status)."""

    def __init__(self, on_reject: Reject | None = None) -> None:
        self._on_reject = on_reject or _no_reject

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler

        async def behaviour(inner, request, context):
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                status = status_of(exc, context.time_remaining())
                if status.code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed (request_id %s)", details.method, current_request_id())
                elif status.code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # shed by a replica behind us
                    self._on_reject(details.method, "out_of_resources" if status.retry_after_s is None
                                    else "backpressure")
                pushback = () if status.retry_after_s is None else (
                    ("grpc-retry-pushback-ms", str(round(status.retry_after_s * 1000))),)
                await context.abort(status.code, status.message, trailing_metadata=pushback)

        return _wrap_unary(handler, behaviour)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health and reflection."""

    def __init__(self, token: str, on_reject: Reject | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject or _no_reject

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return handler

        async def deny(_inner, _request, context):
            self._on_reject(details.method, "unauthenticated")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong token: send metadata `authorization: Bearer <token>`")

        return _wrap_unary(handler, deny)


class FrontDoorHealth(health.aio.HealthServicer):
    """The standard health service, plus whether start-up completed (then API RPCs are admitted)."""

    started = False


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Admits API RPCs once start-up completed and while fewer than `max_inflight` run; health and
    reflection are outside that limit (idle Watch streams cannot lock callers out), their long-lived
    streams capped at `max_streams` per method instead."""

    def __init__(self, health_servicer: FrontDoorHealth, max_inflight: int, max_streams: int,
                 on_reject: Reject | None = None, shedding: Admission | None = None,
                 default_deadline_s: float = 5.0) -> None:
        self._health = health_servicer
        self._on_reject = on_reject or _no_reject
        self._max_inflight = max_inflight
        self._max_streams = max_streams
        self._shedding = shedding  # early RESOURCE_EXHAUSTED when the deadline cannot be met (admission.py)
        self._default_deadline_s = default_deadline_s
        self.inflight = 0
        self.streams: collections.Counter[str] = collections.Counter()
        self._work: dict[Ticket, asyncio.Task] = {}  # admitted requests' work, by their admission ticket

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        if details.method.startswith(_OPEN_PREFIXES):
            # Check is answered at once: no slot to hold. Watch and reflection streams can stay open.
            streaming = handler.unary_stream is not None or handler.stream_stream is not None
            return self._capped_stream(handler, details.method) if streaming else handler
        if handler.unary_unary is None:
            return handler
        return _wrap_unary(handler, functools.partial(self._admit, details.method))

    async def _admit(self, method, inner, request, context):
        if not self._health.started:
            self._on_reject(method, "starting_up")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "starting up: models are still loading; retry")
        if self.inflight >= self._max_inflight:
            self._on_reject(method, "inflight_limit")
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many requests in flight (limit {self._max_inflight}); retry after {LIMIT_RETRY_AFTER_MS} ms",
                trailing_metadata=(("grpc-retry-pushback-ms", str(LIMIT_RETRY_AFTER_MS)),))
        estimator = await self._shed_if_late(method, context)
        self.inflight += 1
        try:
            if estimator is None:
                return await inner(request, context)
            return await self._tracked(estimator, method, inner, request, context)
        finally:
            self.inflight -= 1

    async def _tracked(self, estimator: LoadEstimator, method: str, inner, request, context):
        """Run an admitted request as a task of its own, so that `_shed_if_late` can drop it from the queue
        (cancelling its Serve calls) and still answer it; the caller leaving cancels this coroutine, and with
        it the task it awaits."""
        ticket = estimator.begin()
        work = self._work[ticket] = asyncio.ensure_future(inner(request, context))
        try:
            return await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not ticket.dropped or (current is not None and current.cancelling()):
                raise
            await self._refuse(method, context, estimator.dropped(ticket))
        finally:
            del self._work[ticket]
            estimator.end(ticket)

    async def _shed_if_late(self, method: str, context: grpc.aio.ServicerContext) -> LoadEstimator | None:
        """Abort RESOURCE_EXHAUSTED (with retry advice) when the work in flight cannot finish within this
        request's deadline (gateway/admission.py); else the method's estimator (None: shedding is off).
        A request shed by the latency objective also drops the excess of the queue (`LoadEstimator.excess`)."""
        if self._shedding is None:
            return None
        estimator = self._shedding.estimator(method)
        remaining = context.time_remaining()
        shed = estimator.verdict(self._default_deadline_s if remaining is None else remaining)
        if shed is not None:
            if shed.reason == OBJECTIVE_REASON:
                for ticket in estimator.excess():
                    ticket.dropped = self._work[ticket].cancel()  # False: it finished meanwhile
            await self._refuse(method, context, shed)
        return estimator

    async def _refuse(self, method: str, context: grpc.aio.ServicerContext, shed: Shed) -> None:
        """Count ``shed`` and abort RESOURCE_EXHAUSTED with its message and retry advice."""
        self._on_reject(method, shed.reason)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, shed.message(), trailing_metadata=(
            ("grpc-retry-pushback-ms", str(round(shed.retry_after_s * 1000))),))

    def _capped_stream(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        unary = handler.unary_stream is not None
        inner = handler.unary_stream if unary else handler.stream_stream

        async def capped(request, context):
            if self.streams[method] >= self._max_streams:
                self._on_reject(method, "stream_limit")
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"too many open {method} streams (limit {self._max_streams}); "
                                    "close one or poll with Check")
            self.streams[method] += 1
            try:
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    async for reply in result:
                        await context.write(reply)
                else:
                    await result
            finally:
                self.streams[method] -= 1

        factory = grpc.unary_stream_rpc_method_handler if unary else grpc.stream_stream_rpc_method_handler
        return factory(capped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


async def port_taken(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts connections on host:port already (another Gateway replica sharing it)."""
    if port == 0:
        return False
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host.strip("[]"))
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(target, port), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """Message limits; keepalive so dead peers free their slots; a maximum connection age so long-lived HTTP/2
    connections end (GOAWAY, in-flight RPCs get the grace period) and clients re-balance over Gateway replicas;
    SO_REUSEPORT per ``share_port``."""
    max_bytes = cfg.max_message_mb * 1024 * 1024
    options = [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes),
               ("grpc.keepalive_time_ms", round(cfg.keepalive_time_s * 1000)),
               ("grpc.keepalive_timeout_ms", 20_000),
               # Clients (fusionrec.client) ping idle connections every 5 min: allow it without a GOAWAY.
               ("grpc.http2.min_ping_interval_without_data_ms", 60_000),
               # Several Gateway replicas on one machine share the port (gRPC's default is on: say it, and
               # turn it off when not wanted, so that a second server on a taken port fails to bind).
               ("grpc.so_reuseport", int(cfg.share_port))]
    if cfg.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", round(cfg.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", round(cfg.grace_period_s * 1000))]
    return options


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM files in ``cfg`` (mutual TLS with tls_client_ca_file); None: plaintext."""
    if not cfg.tls_cert_file:
        return None
    try:
        chain = (Path(cfg.tls_key_file).read_bytes(), Path(cfg.tls_cert_file).read_bytes())
        client_ca = Path(cfg.tls_client_ca_file).read_bytes() if cfg.tls_client_ca_file else None
    except OSError as exc:
        raise ValueError(f"server TLS: cannot read {exc.filename}: {exc.strerror}") from exc
    return grpc.ssl_server_credentials([chain], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


async def create_server(servicer: pb_grpc.RecommenderServicer, cfg: ServerConfig, metrics: "Metrics | None" = None,
                        tracing: Tracing | None = None) -> tuple[grpc.aio.Server, int, FrontDoorHealth]:
    """Build and start the server; health starts NOT_SERVING and API RPCs are answered UNAVAILABLE
    until `set_serving(health, True)` marks start-up complete. Returns (server, bound port, health).
    ``metrics``: counts and times every RPC, refusals with their reason (gateway/metrics.py).
    ``tracing``: where spans go (default: from ``cfg``, gateway/tracing.py); request ids and the access
    log: gateway/requestlog.py."""
    health_servicer = FrontDoorHealth()
    reject = metrics.reject if metrics is not None else None
    shedding = (Admission(cfg.admission_headroom, cfg.admission_latency_factor, cfg.admission_overload_margin)
                if cfg.admission_enabled else None)
    admission = AdmissionInterceptor(health_servicer, cfg.max_inflight_requests, cfg.max_open_streams, reject,
                                     shedding, cfg.default_deadline_ms / 1000)
    interceptors: list[grpc.aio.ServerInterceptor] = [admission, ErrorInterceptor(reject)]
    token = cfg.token()
    if token:
        interceptors.insert(0, TokenAuthInterceptor(token, reject))
    # Around auth and admission: refused RPCs get a request id, a trace and a log line too.
    interceptors.insert(0, RequestLogInterceptor(SERVICE_NAME, cfg.access_log_sample_rate,
                                                 tracing or Tracing.from_config(cfg)))
    if metrics is not None:  # outermost: sees every refusal and final code
        interceptors.insert(0, metrics.interceptor())
        metrics.track_inflight(lambda: admission.inflight)
    server = grpc.aio.server(interceptors=interceptors, options=server_options(cfg))
    pb_grpc.add_RecommenderServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    address = f"{cfg.host}:{cfg.port}"
    creds = server_credentials(cfg)
    port = server.add_insecure_port(address) if creds is None else server.add_secure_port(address, creds)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC port {cfg.host}:{cfg.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, port, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """Publish SERVING / NOT_SERVING; the first SERVING also marks start-up complete (API RPCs admitted)."""
    if serving and isinstance(health_servicer, FrontDoorHealth):
        health_servicer.started = True
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
