"""What a failed call raises from the typed client methods: one small exception per status code a caller
acts on, each carrying the gRPC code, the server's message and the request id when the server sent one.

The raw stubs (``client.stub``) still raise ``grpc.RpcError``; ``from_rpc_error`` converts one."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A call to the fusionrec service failed: ``code`` (grpc.StatusCode), ``message`` (the server's
    details), ``method`` (RPC name) and ``request_id`` (from trailing metadata ``x-request-id``, if sent)."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "", request_id: str = "") -> None:
        self.code, self.message, self.method, self.request_id = code, message, method, request_id
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.method}: " if self.method else ""
        rid = f" (request {self.request_id})" if self.request_id else ""
        return f"{where}{self.code.name}: {self.message}{rid}"

    def __reduce__(self):
        return (type(self), (self.code, self.message, self.method, self.request_id))


class InvalidArgumentError(ServiceError, ValueError):
    """The request is wrong (bad id, filter, content); sending it again cannot help."""


class NotFoundError(ServiceError, LookupError):
    """The item (or user) does not exist."""


class UnauthenticatedError(ServiceError):
    """Missing or wrong token."""


class PermissionDeniedError(ServiceError):
    """The token is not allowed to do this."""


class FailedPreconditionError(ServiceError):
    """The service is not in a state to do this (e.g. vectors made by another encoder version)."""


class ResourceExhaustedError(ServiceError):
    """Overloaded or over a limit; ``retry_after_s`` is the server's advice when it gave one."""

    retry_after_s: float | None = None


class UnavailableError(ServiceError, ConnectionError):
    """Unreachable, starting up or restarting, after the client's retries."""


class DeadlineExceededError(ServiceError, TimeoutError):
    """The deadline ran out before the answer came."""


BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def _trailer(err: grpc.RpcError, key: str) -> str:
    trailing = getattr(err, "trailing_metadata", None)
    pairs = (trailing() if callable(trailing) else trailing) or ()
    return next((str(v) for k, v in pairs if k == key), "")


def from_rpc_error(err: grpc.RpcError, method: str = "") -> ServiceError:
    """The typed exception for a failed call (sync or grpc.aio)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (err.details() if callable(getattr(err, "details", None)) else "") or ""
    exc = BY_CODE.get(code, ServiceError)(code, details, method, _trailer(err, "x-request-id"))
    pushback = _trailer(err, "grpc-retry-pushback-ms")
    if isinstance(exc, ResourceExhaustedError) and pushback.isdigit():
        exc.retry_after_s = int(pushback) / 1000
    return exc
