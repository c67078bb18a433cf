"""Domain exceptions and the one place that maps them to gRPC status codes."""

from __future__ import annotations

import grpc

from encoders.base import InvalidContent
from gateway.store.base import SchemaMismatch


class FusionrecError(Exception):
    """Base of errors a caller can act on; ``code`` is the gRPC status sent back."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def __reduce__(self):  # survive pickling across Ray processes with the message intact
        return (type(self), (self.message,))


class InvalidArgument(FusionrecError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FusionrecError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(FusionrecError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(FusionrecError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(FusionrecError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(FusionrecError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(FusionrecError):
    code = grpc.StatusCode.UNAVAILABLE


def _cause(exc: BaseException) -> BaseException:
    # Ray wraps remote exceptions (RayTaskError) but keeps the original as .cause.
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and caller-facing message for an exception."""
    exc = _cause(exc)
    if isinstance(exc, FusionrecError):
        return exc.code, exc.message
    if isinstance(exc, InvalidContent):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, SchemaMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server logs"
