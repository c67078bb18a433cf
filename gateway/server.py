"""The grpc.aio front door: servicer + standard health + reflection + auth and error interceptors."""

from __future__ import annotations

import collections
import hmac
import inspect
import logging
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from fusionrec.gateway.config import ServerConfig
from fusionrec.gateway.errors import status_of

# Serve routes "ray.serve" records into the replica log files (logs/serve/replica_*.log).
log = logging.getLogger("ray.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
# Probes and discovery stay open so orchestrators and grpcurl work without a token, and outside the
# API's in-flight limit (their long-lived streams have a cap of their own: see AdmissionInterceptor).
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
#: Retry advice with RESOURCE_EXHAUSTED from the in-flight limit.
LIMIT_RETRY_AFTER_MS = 100


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
                    log.exception("%s failed", details.method)
                pushback = () if status.retry_after_s is None else (
                    ("grpc-retry-pushback-ms", str(round(status.retry_after_s * 1000))),)
                await context.abort(status.code, status.message, trailing_metadata=pushback)

        return _wrap_unary(handler, behaviour)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health and reflection."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return handler

        async def deny(_inner, _request, context):
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

    def __init__(self, health_servicer: FrontDoorHealth, max_inflight: int, max_streams: int) -> None:
        self._health = health_servicer
        self._max_inflight = max_inflight
        self._max_streams = max_streams
        self.inflight = 0
        self.streams: collections.Counter[str] = collections.Counter()

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
        return _wrap_unary(handler, self._admit)

    async def _admit(self, inner, request, context):
        if not self._health.started:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "starting up: models are still loading; retry")
        if self.inflight >= self._max_inflight:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many requests in flight (limit {self._max_inflight}); retry after {LIMIT_RETRY_AFTER_MS} ms",
                trailing_metadata=(("grpc-retry-pushback-ms", str(LIMIT_RETRY_AFTER_MS)),))
        self.inflight += 1
        try:
            return await inner(request, context)
        finally:
            self.inflight -= 1

    def _capped_stream(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        unary = handler.unary_stream is not None
        inner = handler.unary_stream if unary else handler.stream_stream

        async def capped(request, context):
            if self.streams[method] >= self._max_streams:
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


async def create_server(servicer: pb_grpc.RecommenderServicer, cfg: ServerConfig
                        ) -> tuple[grpc.aio.Server, int, FrontDoorHealth]:
    """Build and start the server; health starts NOT_SERVING and API RPCs are answered UNAVAILABLE
    until `set_serving(health, True)` marks start-up complete. Returns (server, bound port, health)."""
    health_servicer = FrontDoorHealth()
    interceptors: list[grpc.aio.ServerInterceptor] = [
        AdmissionInterceptor(health_servicer, cfg.max_inflight_requests,
                             cfg.max_open_streams),
        ErrorInterceptor()]
    if cfg.auth_token:
        interceptors.insert(0, TokenAuthInterceptor(cfg.auth_token))
    max_bytes = cfg.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", max_bytes),
                 ("grpc.max_send_message_length", max_bytes)])
    pb_grpc.add_RecommenderServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
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
