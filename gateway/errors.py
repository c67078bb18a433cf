"""The one place that maps errors to gRPC status codes: domain errors (core/errors.py) first, then Ray's.

Ray's classes are imported lazily and each one guarded, so this module imports without Ray and keeps
working if a Ray release renames one of them.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, NamedTuple

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

#: Retry advice when Serve's back-pressure gives none (BackPressureError.retry_after_s is None).
DEFAULT_RETRY_AFTER_S = 0.5
_RESTARTING = "a replica behind the gateway is restarting or gone ({name}); retry"
_TIMED_OUT = "a replica behind the gateway did not answer in time ({name}); it may be restarting or stuck; retry"


class Status(NamedTuple):
    code: grpc.StatusCode
    message: str
    retry_after_s: float | None = None  # sent as `grpc-retry-pushback-ms` trailing metadata


def _back_pressure(exc: BaseException) -> Status:
    after = getattr(exc, "retry_after_s", None) or DEFAULT_RETRY_AFTER_S
    return Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                  f"overloaded: {getattr(exc, 'message', exc)} retry after {after * 1000:.0f} ms", after)


def _fixed(code: grpc.StatusCode, template: str) -> Callable[[BaseException], Status]:
    return lambda exc: Status(code, template.format(name=type(exc).__name__))


_UNAVAILABLE = _fixed(grpc.StatusCode.UNAVAILABLE, _RESTARTING)
_EXHAUSTED = _fixed(grpc.StatusCode.RESOURCE_EXHAUSTED, "server out of resources ({name}); retry later")

#: (module, class name, status): most specific first. Timeouts (TimeoutError, GetTimeoutError) are
#: handled in `to_status`, since their code depends on the caller's remaining deadline.
RAY_STATUSES: tuple[tuple[str, str, Callable[[BaseException], Status]], ...] = (
    ("ray.serve.exceptions", "BackPressureError", _back_pressure),
    ("ray.serve.exceptions", "DeploymentUnavailableError", _UNAVAILABLE),
    ("ray.serve.exceptions", "ReplicaUnavailableError", _UNAVAILABLE),
    ("ray.serve.exceptions", "RequestCancelledError",
     _fixed(grpc.StatusCode.CANCELLED, "the request was cancelled ({name})")),
    ("ray.exceptions", "RayActorError", _UNAVAILABLE),  # ActorDiedError, ActorUnavailableError
    ("ray.exceptions", "WorkerCrashedError", _UNAVAILABLE),
    ("ray.exceptions", "NodeDiedError", _UNAVAILABLE),
    ("ray.exceptions", "ObjectLostError", _UNAVAILABLE),  # OwnerDiedError, ObjectFetchTimedOutError
    ("ray.exceptions", "PendingCallsLimitExceeded", _back_pressure),
    ("ray.exceptions", "OutOfMemoryError", _EXHAUSTED),
    ("ray.exceptions", "ObjectStoreFullError", _EXHAUSTED),
)


@functools.cache
def _ray_classes() -> tuple[tuple[type, Callable[[BaseException], Status]], ...]:
    found = []
    for module, name, status in RAY_STATUSES:
        try:
            found.append((getattr(importlib.import_module(module), name), status))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _cause(exc: BaseException) -> BaseException:
    # Ray wraps remote exceptions (RayTaskError) but keeps the original as .cause, nested once per hop.
    for _ in range(8):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc


def status_of(exc: BaseException, time_remaining: float | None = None) -> Status:
    """The gRPC status, caller-facing message and retry advice for an exception.

    time_remaining: seconds left of the caller's deadline (None: the caller set none). A timeout with
    the caller's time spent is DEADLINE_EXCEEDED; one on a server-side cap while the caller still had
    time is UNAVAILABLE (the replica is restarting or stuck; a retry may find another).
    """
    exc = _cause(exc)
    for cls, code in STATUS_CODES.items():
        if isinstance(exc, cls):
            return Status(code, exc.message)
    for cls, status in _ray_classes():
        if isinstance(exc, cls):
            return status(exc)
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError, ray.exceptions.GetTimeoutError, Serve's
        if time_remaining is not None and time_remaining <= 0.001:
            return Status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded; allow more time")
        return _fixed(grpc.StatusCode.UNAVAILABLE, _TIMED_OUT)(exc)
    return Status(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server logs")


def to_status(exc: BaseException, time_remaining: float | None = None) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and caller-facing message for an exception (see `status_of`)."""
    status = status_of(exc, time_remaining)
    return status.code, status.message
