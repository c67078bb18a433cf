"""The grpc.aio front door: servicer + standard health + reflection + auth and error interceptors."""

from __future__ import annotations

import hmac
import logging
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from fusionrec.gateway.config import ServerConfig
from fusionrec.gateway.errors import to_status

# Serve routes "ray.serve" records into the replica log files (logs/serve/replica_*.log).
log = logging.getLogger("ray.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
# Probes and discovery stay open so orchestrators and grpcurl work without a token.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


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
                code, message = to_status(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", details.method)
                await context.abort(code, message)

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


async def create_server(servicer: pb_grpc.RecommenderServicer, cfg: ServerConfig
                        ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build and start the server; health starts NOT_SERVING. Returns (server, bound port, health)."""
    interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor()]
    if cfg.auth_token:
        interceptors.insert(0, TokenAuthInterceptor(cfg.auth_token))
    max_bytes = cfg.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=cfg.max_inflight_requests,
        options=[("grpc.max_receive_message_length", max_bytes),
                 ("grpc.max_send_message_length", max_bytes)])
    pb_grpc.add_RecommenderServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
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
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
