"""Client settings, typed, and what they become for gRPC: channel options, the service config JSON
(retries, load balancing) and channel credentials (TLS, bearer token)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SERVICE = "fusionrec.v1.Recommender"
HEALTH_SERVICE = "grpc.health.v1.Health"
#: Safe to send twice: reads, and writes keyed by item id. RecordInteractions appends events, so a
#: retry after an UNAVAILABLE that came late (the server had recorded them) would record them twice.
IDEMPOTENT_METHODS = ((SERVICE, "Recommend"), (SERVICE, "GetItem"), (SERVICE, "UpsertItems"),
                      (SERVICE, "DeleteItems"), (HEALTH_SERVICE, "Check"))
#: Methods that write: they get ``write_deadline_s`` (encoding a batch of images takes a while).
WRITE_METHODS = frozenset({"UpsertItems", "DeleteItems", "RecordInteractions"})


class ClientOptions(BaseModel):
    """How a fusionrec client connects and calls. Every field has a working default for a local service."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field("127.0.0.1:9000", description="host:port (or any gRPC target, e.g. dns:///svc:9000).")
    token: str = Field("", repr=False, description="Bearer token sent as `authorization: Bearer <token>`; "
                       "'' sends none.")
    deadline_s: float = Field(10.0, gt=0, description="Deadline of Recommend, GetItem and health checks "
                              "when the call gives none.")
    write_deadline_s: float = Field(120.0, gt=0, description="Deadline of UpsertItems, DeleteItems and "
                                    "RecordInteractions when the call gives none (encoding takes time).")
    tls: bool = Field(False, description="Use TLS. Implied by any of the certificate paths.")
    root_certs_path: Path | None = Field(None, description="PEM roots to trust; None: the system's roots.")
    client_cert_path: Path | None = Field(None, description="PEM client certificate, for mutual TLS.")
    client_key_path: Path | None = Field(None, description="PEM client private key, for mutual TLS.")
    tls_server_name: str = Field("", description="Name to verify in the server certificate instead of the "
                                 "target's host (testing, or addressing a server by IP).")
    max_message_mb: int = Field(64, ge=1, description="Largest message sent or received, in MiB.")
    retry_max_attempts: int = Field(4, ge=1, le=5, description="Attempts per call, first included, for codes in "
                                    "retryable_codes (1: no retries; gRPC caps it at 5). RecordInteractions "
                                    "is never retried this way: it is not idempotent.")
    retry_initial_backoff_s: float = Field(0.2, gt=0, description="Upper bound of the first random backoff.")
    retry_max_backoff_s: float = Field(5.0, gt=0, description="Upper bound of any backoff.")
    retry_backoff_multiplier: float = Field(2.0, gt=0, description="Backoff growth per attempt.")
    retryable_codes: tuple[str, ...] = Field(("UNAVAILABLE",), description="Status codes retried, by name "
                                             "(RESOURCE_EXHAUSTED may be added: the server sends pushback).")
    retry_buffer_mb: int = Field(16, ge=0, description="Request bytes gRPC keeps per call to be able to retry it "
                                 "(gRPC's default 256 KiB would leave image upserts unretried).")
    keepalive_time_s: float = Field(300.0, gt=0, description="Ping interval while calls are open; servers by "
                                    "default refuse pings more often than every 5 min (GOAWAY too_many_pings).")
    keepalive_timeout_s: float = Field(20.0, gt=0, description="A ping unanswered this long drops the connection.")
    idle_timeout_s: float = Field(300.0, gt=0, description="An idle channel releases its connections and resolves "
                                  "the target again on next use, so new backends behind a balancer get calls.")
    load_balancing: Literal["round_robin", "pick_first"] = Field(
        "round_robin", description="Over the addresses the target resolves to: round_robin spreads calls over "
        "all of them (a headless DNS name), pick_first uses one connection.")

    @field_validator("retryable_codes")
    @classmethod
    def _known_codes(cls, codes: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in codes if c not in grpc.StatusCode.__members__ or c == "OK"]
        if unknown:
            raise ValueError(f"unknown status codes {unknown}; use names like UNAVAILABLE")
        return codes

    @model_validator(mode="after")
    def _tls_pairs(self) -> "ClientOptions":
        if (self.client_cert_path is None) != (self.client_key_path is None):
            raise ValueError("client_cert_path and client_key_path go together (mutual TLS)")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(p is not None for p in (self.root_certs_path, self.client_cert_path))

    def deadline_for(self, method: str) -> float:
        """Default deadline in seconds of a full method name (``/fusionrec.v1.Recommender/UpsertItems``)."""
        return self.write_deadline_s if method.rsplit("/", 1)[-1] in WRITE_METHODS else self.deadline_s


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def service_config(options: ClientOptions) -> dict:
    """gRPC service config: a retry policy on the idempotent methods, throttled so that a failing server
    does not get a retry storm, and the load-balancing policy."""
    config: dict = {"loadBalancingConfig": [{options.load_balancing: {}}]}
    if options.retry_max_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": s, "method": m} for s, m in IDEMPOTENT_METHODS],
            "retryPolicy": {
                "maxAttempts": options.retry_max_attempts,
                "initialBackoff": _duration(options.retry_initial_backoff_s),
                "maxBackoff": _duration(max(options.retry_max_backoff_s, options.retry_initial_backoff_s)),
                "backoffMultiplier": options.retry_backoff_multiplier,
                "retryableStatusCodes": list(options.retryable_codes),
            }}]
        # Retries stop while more than half the tokens are spent: each failure costs 1, a success gives 0.1.
        config["retryThrottling"] = {"maxTokens": 10, "tokenRatio": 0.1}
    return config


def channel_options(options: ClientOptions, user_agent: str = "fusionrec-client") -> list[tuple[str, object]]:
    """Channel arguments: message limits, retries (service config), keepalive, idle timeout."""
    size = options.max_message_mb * 1024 * 1024
    out: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(options))),
        ("grpc.per_rpc_retry_buffer_size", options.retry_buffer_mb * 1024 * 1024),
        ("grpc.keepalive_time_ms", round(options.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(options.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.client_idle_timeout_ms", round(options.idle_timeout_s * 1000)),
        ("grpc.primary_user_agent", user_agent),
    ]
    if options.tls_server_name:
        out.append(("grpc.ssl_target_name_override", options.tls_server_name))
    return out


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def channel_credentials(options: ClientOptions) -> grpc.ChannelCredentials | None:
    """TLS credentials, with the bearer token as call credentials when there is one; None for plaintext
    (gRPC sends call credentials only over a secure channel: a plaintext client sends the token as metadata)."""
    if not options.uses_tls:
        return None
    creds = grpc.ssl_channel_credentials(root_certificates=_read(options.root_certs_path),
                                         private_key=_read(options.client_key_path),
                                         certificate_chain=_read(options.client_cert_path))
    if options.token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(options.token))
    return creds


def auth_metadata(options: ClientOptions) -> tuple[tuple[str, str], ...]:
    """What a plaintext caller adds to each call for auth (nothing over TLS: the credentials carry it)."""
    if options.token and not options.uses_tls:
        return (("authorization", f"Bearer {options.token}"),)
    return ()


def make_options(base: ClientOptions | None = None, **updates: object) -> ClientOptions:
    """``base`` (default: defaults) with the given fields replaced, validated; ``None`` values are ignored."""
    fields = base.model_dump() if base is not None else {}
    fields.update({k: v for k, v in updates.items() if v is not None})
    return ClientOptions(**fields)
