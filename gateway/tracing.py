"""OpenTelemetry traces of the front door: one trace per API RPC, a child span per pipeline stage.

Where spans go: an OTLP/gRPC exporter of our own when ``ServerConfig.otlp_endpoint`` is set;
otherwise the process's global tracer provider, a no-op unless something installed one (Ray
Serve's own tracing does, see `serve_span_processors`), so tracing costs nothing by default.

The RPC's root span is made by the request-log interceptor (gateway/requestlog.py), which also
puts its tracer in a context variable: `stage()` in the pipeline makes children of whatever span is
current with that tracer, so code below the front door needs no tracer of its own. A caller's W3C
``traceparent`` metadata makes the root span a child of the caller's span. Serve handle calls made
inside a stage span carry the current context, so replicas running Serve's tracing add their spans
under it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fusionrec.gateway.config import ServerConfig

SERVICE_NAME = "fusionrec-gateway"
TRACER_NAME = "fusionrec.gateway"
#: Server-side faults per OpenTelemetry's gRPC conventions; a caller's mistake (INVALID_ARGUMENT,
#: NOT_FOUND, ...) leaves the server span's status unset.
SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                           grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER: contextvars.ContextVar[trace.Tracer] = contextvars.ContextVar("fusionrec_tracer",
                                                                       default=trace.NoOpTracer())


def otlp_span_processor(endpoint: str | None = None) -> SpanProcessor:
    """Batched OTLP/gRPC export; ``endpoint`` None: OpenTelemetry's OTEL_EXPORTER_OTLP_* variables."""
    # Imported here: the exporter (and its protobuf modules) load only where export is configured.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))


def serve_span_processors() -> list[SpanProcessor]:
    """Ray Serve's tracing exporter hook: start Ray with
    RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=fusionrec.gateway.tracing:serve_span_processors and
    OTEL_EXPORTER_OTLP_ENDPOINT set, and every replica exports Serve's spans (routing, each handle
    call in the replica that serves it) to that collector, under the Gateway's stage spans."""
    return [otlp_span_processor()]


class Tracing:
    """The tracer of the front door's spans and, when it made one, the provider to flush on shutdown."""

    def __init__(self, provider: trace.TracerProvider | None = None, owned: bool = False) -> None:
        self.provider = provider if provider is not None else trace.get_tracer_provider()
        self.tracer = self.provider.get_tracer(TRACER_NAME)
        self._owned = owned

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> "Tracing":
        """OTLP export of our own when ``cfg.otlp_endpoint`` is set, else the global provider."""
        if not cfg.otlp_endpoint:
            return cls()
        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}),
                                  sampler=ParentBased(TraceIdRatioBased(cfg.trace_sample_rate)))
        provider.add_span_processor(otlp_span_processor(cfg.otlp_endpoint))
        return cls(provider, owned=True)

    def shutdown(self) -> None:
        """Export what is buffered (a provider we made only; the global one belongs to its owner)."""
        if self._owned and isinstance(self.provider, TracerProvider):
            self.provider.shutdown()

    @contextlib.contextmanager
    def rpc_span(self, service: str, method: str, metadata: Sequence[tuple[str, str | bytes]],
                 request_id: str) -> Iterator[Span]:
        """The RPC's root (server) span, current while the handler runs; `stage()` spans go under it."""
        carrier = {k: v for k, v in metadata if isinstance(v, str)}
        parent = _PROPAGATOR.extract(carrier)  # the caller's traceparent, if any
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, "request_id": request_id}
        token = _TRACER.set(self.tracer)
        try:
            # Status and exceptions are set by the caller from the gRPC outcome (end_rpc_span).
            with self.tracer.start_as_current_span(f"{service}/{method}", context=parent, kind=SpanKind.SERVER,
                                                   attributes=attributes, record_exception=False,
                                                   set_status_on_exception=False) as span:
                yield span
        finally:
            _TRACER.reset(token)


def end_rpc_span(span: Span, code: grpc.StatusCode, details: str, attributes: dict[str, object]) -> None:
    """Record the RPC's outcome on its root span (before it ends)."""
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    for key, value in attributes.items():
        if isinstance(value, (bool, int, float, str)):
            span.set_attribute(f"fusionrec.{key}", value)
    if code in SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))


@contextlib.contextmanager
def stage(name: str, **attributes: str | int | float | bool) -> Iterator[Span]:
    """A child span of the current one for a pipeline stage (no-op outside a traced RPC)."""
    with _TRACER.get().start_as_current_span(name, attributes=attributes) as span:
        yield span


def trace_id(span: Span) -> str:
    """The span's trace id in hex ("" when it is not recorded), for log lines that point at the trace."""
    ctx = span.get_span_context()
    return trace.format_trace_id(ctx.trace_id) if span.is_recording() and ctx.is_valid else ""


__all__ = ["Tracing", "end_rpc_span", "otlp_span_processor", "serve_span_processors", "stage", "trace_id"]
