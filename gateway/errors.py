"""The one place that maps domain errors (core/errors.py) to gRPC status codes."""

from __future__ import annotations

import grpc

from fusionrec.core.errors import (DeadlineExceeded, FailedPrecondition, FusionrecError, InvalidArgument, NotFound,
                                   Unavailable)

#: Most specific first: SchemaMismatch is a FailedPrecondition, InvalidContent an InvalidArgument.
STATUS_CODES: dict[type[FusionrecError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def _cause(exc: BaseException) -> BaseException:
    # Ray wraps remote exceptions (RayTaskError) but keeps the original as .cause.
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and caller-facing message for an exception."""
    exc = _cause(exc)
    for cls, code in STATUS_CODES.items():
        if isinstance(exc, cls):
            return code, exc.message
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server logs"
