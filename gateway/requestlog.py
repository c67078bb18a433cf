"""Request ids and the access log: every API RPC gets an id, a trace and one JSON line.

The request id is the caller's ``x-request-id`` metadata, or a fresh uuid4 hex when none is sent.
A sent id must be 1-128 visible ASCII characters (``!`` to ``~``: no spaces, so log lines stay
greppable and parseable); anything else is refused with INVALID_ARGUMENT rather than silently
replaced, so the caller learns that the id it means to search for would not be found. The id comes
back in trailing metadata ``x-request-id`` on every Recommender RPC, failed ones included (a refused
id gets a generated one), and Recommend's answer carries it as ``request_id``.

One JSON line per RPC on the ``fusionrec.access`` logger (inside a Serve replica: appended to the
Gateway replica's own log file, see `write_to`): method, request id, status code, duration, peer,
and what is cheap to read off the request and answer (k, result count, degraded, dropped modalities
with their reasons). Failed and degraded RPCs are always logged; the others at
``access_log_sample_rate``. Health and reflection RPCs are left alone (probes would drown the log).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import logging
import logging.handlers
import random
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any, Awaitable, Callable, Sequence

import grpc

from fusionrec.gateway.tracing import Tracing, end_rpc_span, trace_id

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
_VALID_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")
ACCESS_LOGGER = "fusionrec.access"
#: Longest error message kept in a log line.
MAX_ERROR_CHARS = 500

access_log = logging.getLogger(ACCESS_LOGGER)
_REQUEST_ID: ContextVar[str] = ContextVar("fusionrec_request_id", default="")


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str:
    """The id of the RPC being served; outside one (the pipeline driven from plain Python), a fresh one."""
    return _REQUEST_ID.get() or new_request_id()


def request_id_problem(sent: str) -> str | None:
    """Why ``sent`` cannot be a request id, or None when it can."""
    if _VALID_ID.fullmatch(sent):
        return None
    return (f"{REQUEST_ID_KEY} must be 1-{MAX_REQUEST_ID_CHARS} visible ASCII characters (no spaces); "
            f"got {len(sent)} characters; send another or none (the server then makes one)")


def _summary(method: str, request: Any, response: Any) -> dict[str, Any]:
    """Cheap facts about the request and, when it succeeded, the answer (a few len() calls, no copies)."""
    if method == "Recommend":
        out: dict[str, Any] = {"k": request.k}  # as sent; 0: the server's default
        if response is not None:
            out |= {"results": len(response.items), "degraded": response.degraded,
                    "dropped": {d.modality: d.reason for d in response.modalities_dropped}}
        return out
    sizes = {"UpsertItems": ("items", "upserted"), "DeleteItems": ("item_ids", "deleted"),
             "RecordInteractions": ("interactions", "recorded")}
    if method not in sizes:
        return {}
    field, result = sizes[method]
    out = {field: len(getattr(request, field))}
    if response is not None:
        out[result] = getattr(response, result)
    return out


class _TaggedContext:
    """The servicer context as handlers below see it: every trailer they set, abort's included,
    keeps the request id (an abort sends its trailers at once; they cannot be amended after)."""

    def __init__(self, context: grpc.aio.ServicerContext, request_id: str) -> None:
        self._context = context
        self._tag = (REQUEST_ID_KEY, request_id)
        context.set_trailing_metadata((self._tag,))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def _tagged(self, metadata: Sequence[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
        return tuple(p for p in metadata or () if p[0] != REQUEST_ID_KEY) + (self._tag,)

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, Any]]) -> None:
        self._context.set_trailing_metadata(self._tagged(trailing_metadata))

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, Any]] = ()) -> None:
        await self._context.abort(code, details, self._tagged(trailing_metadata))

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)


def _unary(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Awaitable]) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary

    async def wrapped(request, context):
        return await behaviour(inner, request, context)

    return grpc.unary_unary_rpc_method_handler(wrapped, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


def final_code(context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    """The status an RPC ended with when ``exc`` escaped its handler: an abort's own code; a cancellation is
    DEADLINE_EXCEEDED once the caller's deadline passed, else CANCELLED (the caller went away)."""
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED
    return context.code() or grpc.StatusCode.UNKNOWN


class RequestLogInterceptor(grpc.aio.ServerInterceptor):
    """Outermost on API RPCs: assigns the request id, opens the root span, writes the access line."""

    def __init__(self, service: str, sample_rate: float = 1.0, tracing: Tracing | None = None) -> None:
        self._service = service
        self._prefix = f"/{service}/"
        self._sample_rate = sample_rate
        self._tracing = tracing or Tracing()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith(self._prefix):
            return handler
        method = details.method[len(self._prefix):]
        metadata = tuple(details.invocation_metadata or ())
        return _unary(handler, functools.partial(self._serve, method, metadata))

    async def _serve(self, method: str, metadata: tuple, inner, request, context):
        started = time.perf_counter()
        sent = next((str(v) for k, v in metadata if k == REQUEST_ID_KEY), "")
        problem = request_id_problem(sent) if sent else None
        request_id = sent if sent and problem is None else new_request_id()
        token = _REQUEST_ID.set(request_id)
        tagged = _TaggedContext(context, request_id)
        response, code = None, grpc.StatusCode.UNKNOWN
        with self._tracing.rpc_span(self._service, method, metadata, request_id) as span:
            try:
                if problem:
                    await tagged.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                response = await inner(request, tagged)
                code = context.code() or grpc.StatusCode.OK
                return response
            except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
                code = final_code(context, exc)
                raise
            finally:
                _REQUEST_ID.reset(token)
                facts = _summary(method, request, response)
                error = "" if code == grpc.StatusCode.OK else str(context.details() or code.name)
                end_rpc_span(span, code, error, facts)
                self._log(method, request_id, code, started, context, facts, error, trace_id(span))

    def _log(self, method: str, request_id: str, code: grpc.StatusCode, started: float,
             context: grpc.aio.ServicerContext, facts: dict[str, Any], error: str, trace: str) -> None:
        always = code != grpc.StatusCode.OK or facts.get("degraded")
        if not always and random.random() >= self._sample_rate:
            return
        line: dict[str, Any] = {
            "ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "logger": ACCESS_LOGGER, "method": method, "request_id": request_id, "code": code.name,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2), "peer": context.peer(), **facts}
        if error:
            line["error"] = error[:MAX_ERROR_CHARS]
        if trace:
            line["trace_id"] = trace
        access_log.info(json.dumps(line, separators=(",", ":"), ensure_ascii=True))


def serve_log_file(logger_name: str = "ray.serve") -> str | None:
    """The file Ray Serve writes this replica's log to (logs/serve/replica_<app>_<deployment>_<id>.log
    under Ray's session dir), found through the handlers Serve gives its logger; None outside a replica."""
    for handler in logging.getLogger(logger_name).handlers:
        target = getattr(handler, "target", None) or handler  # Serve buffers through a MemoryHandler
        path = getattr(target, "baseFilename", None)
        if path:
            return str(path)
    return None


def write_to(path: str) -> logging.Handler:
    """Append access lines, bare JSON, to ``path`` (the replica's own log file: operators find one file
    per replica with both). Reopens the file when Serve rotates it; returns the handler (one per path)."""
    for handler in access_log.handlers:
        if getattr(handler, "baseFilename", None) == path:
            return handler
    handler = logging.handlers.WatchedFileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False  # not also into the worker's stderr file
    return handler


__all__ = ["ACCESS_LOGGER", "REQUEST_ID_KEY", "RequestLogInterceptor", "current_request_id", "new_request_id",
           "request_id_problem", "serve_log_file", "write_to"]
