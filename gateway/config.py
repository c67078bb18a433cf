"""Typed configuration of the fusionrec application (the `args` of the Serve config)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fusionrec.core.paths import home
from fusionrec.core.rules import ID_MAX_BYTES
from fusionrec.encoders.base import MODALITIES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def secret(value: str, env_name: str, setting: str) -> str:
    """``value``, or the environment variable ``env_name`` when one is named (it must then be set and non-empty)."""
    if not env_name:
        return value
    found = os.environ.get(env_name, "")
    if not found:
        raise ValueError(f"{setting} names {env_name!r}, which is unset or empty in this replica's environment "
                         "(set it in runtime_env.env_vars or the pod's env)")
    return found


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Interface the gRPC front door binds; keep loopback unless fronted by a proxy.")
    port: int = Field(9000, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    auth_token: str = Field("", description="If set, callers must send `authorization: Bearer <token>`.")
    auth_token_env: str = Field("", description="Name of an environment variable holding the token instead (keeps "
                                                "the secret out of the Serve config; e.g. a Kubernetes Secret).")
    tls_cert_file: str = Field("", description="PEM certificate chain: with tls_key_file, the front door speaks TLS.")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str = Field("", description="PEM CA bundle: if set, callers must present a client "
                                                    "certificate it signed (mutual TLS).")
    allow_insecure_bind: bool = Field(False, description="Allow binding a non-loopback host without TLS and a "
                                                         "token (a private network, TLS ended by a mesh or proxy).")
    max_connection_age_s: float = Field(300.0, ge=0, description="Connections are closed (GOAWAY, in-flight RPCs "
                                                                 "finish) after this long, so load balancers can "
                                                                 "spread clients over Gateway replicas; 0 = never.")
    keepalive_time_s: float = Field(60.0, gt=0, description="Server pings idle connections this often, so dead "
                                                            "peers free their slots.")
    max_inflight_requests: int = Field(256, ge=1, description="Concurrent API RPCs beyond which the gateway answers "
                                                              "RESOURCE_EXHAUSTED; health and reflection not counted.")
    max_open_streams: int = Field(64, ge=1, description="Open Health.Watch (and reflection) streams per method.")
    health_interval_s: float = Field(2.0, gt=0, description="How often health re-checks the deployments behind it.")
    max_call_ms: int = Field(120_000, ge=1, description="Longest any RPC runs when the caller sets no deadline (or a "
                                                        "longer one); beyond it: DEADLINE_EXCEEDED, the work cancelled.")
    max_message_mb: int = Field(64, ge=1, description="Largest request accepted, in MiB.")
    default_deadline_ms: int = Field(5000, ge=1, description="Deadline applied when the caller sets none.")
    ranking_reserve_ms: int = Field(50, ge=0, description="Time kept back from encoders for retrieval and ranking "
                                                          "(at least; see encode_budget_share).")
    encode_budget_share: float = Field(0.7, gt=0, le=1, description="Share of a Recommend's remaining deadline that "
                                                                    "query encoders may use; the rest is kept for "
                                                                    "retrieval and ranking (a late encoder is dropped).")
    admission_enabled: bool = Field(True, description="Shed a request at once (RESOURCE_EXHAUSTED with retry advice) "
                                                      "when the work in flight ahead of it cannot finish within its "
                                                      "deadline (gateway/admission.py).")
    admission_headroom: float = Field(0.8, gt=0, le=1, description="Admit only when the estimated finish is within "
                                                                   "this share of the caller's remaining deadline.")
    admission_latency_factor: float = Field(1.5, ge=0, description="Latency objective, while overloaded (see "
                                                                   "admission_overload_margin): also shed when the "
                                                                   "estimated latency exceeds this many times the "
                                                                   "median latency of recent requests that ran alone "
                                                                   "(1.5: admitted p99 within 2 x the unloaded p99 "
                                                                   "at twice the saturating load; at 2 it was "
                                                                   "2.1-2.3 x); 0 = off (only the caller's deadline "
                                                                   "bounds queueing). README: Limits and failure "
                                                                   "behaviour.")
    admission_overload_margin: float = Field(0.2, ge=0, description="Overloaded = over the last 2 s, requests offered "
                                                                    "(admitted or shed) faster than 1 + this margin "
                                                                    "times the measured capacity (1 / service time) "
                                                                    "and than 1 + this margin times they completed "
                                                                    "(a queue that grows). Callers that wait for "
                                                                    "their answers never are: they are not shed by the "
                                                                    "objective, so Serve still sees their queued work "
                                                                    "and autoscales.")
    share_port: bool = Field(True, description="Bind the gRPC port with SO_REUSEPORT so that several Gateway replicas "
                                               "on one machine serve the same port (the kernel spreads connections; "
                                               "one replica's loss leaves the port answering).")
    grace_period_s: float = Field(5.0, ge=0, description="In-flight RPCs get this long to finish on shutdown.")
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics at http://<metrics_host>:<metrics_port>"
                                                    "/metrics from the Gateway replica (gateway/metrics.py).")
    metrics_host: str = Field("127.0.0.1", description="Interface the metrics endpoint binds.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Metrics port (0 picks a free one; the bound one "
                                                                "is in the Gateway's ready() answer). Each Gateway "
                                                                "replica serves its own counters on its own port: the "
                                                                "first free one of metrics_port .. + metrics_port_span - 1.")
    metrics_port_span: int = Field(8, ge=1, le=64, description="Ports tried from metrics_port on, one per Gateway "
                                                               "replica on a machine (scrape each as its own target).")
    metrics_refresh_s: float = Field(5.0, gt=0, description="Stats pulled from the other replicas (encoder "
                                                            "batches, store size, progress) are reused this long.")
    metrics_wait_ms: int = Field(1000, ge=0, description="Longest a scrape waits for fresh replica stats before "
                                                         "answering with the last ones pulled.")
    access_log_sample_rate: float = Field(
        1.0, ge=0, le=1, description="Share of successful, non-degraded API RPCs given a JSON line on the "
                                     "`fusionrec.access` logger; failed and degraded ones are always logged.")
    otlp_endpoint: str = Field("", description="OTLP/gRPC collector for traces (e.g. http://127.0.0.1:4317; "
                                               "https:// for TLS); empty: no exporter of our own (gateway/tracing.py).")
    trace_sample_rate: float = Field(1.0, ge=0, le=1, description="Share of new traces recorded when otlp_endpoint "
                                                                  "is set; a caller's sampled traceparent is followed.")

    @model_validator(mode="after")
    def _check_tls(self) -> "ServerConfig":
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("server.tls_cert_file and server.tls_key_file go together: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("server.tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.auth_token and self.auth_token_env:
            raise ValueError("set server.auth_token or server.auth_token_env, not both")
        exposed = self.host not in LOOPBACK_HOSTS or self.metrics_host not in LOOPBACK_HOSTS
        if exposed and not self.allow_insecure_bind and not (
                self.tls_cert_file and (self.auth_token or self.auth_token_env)):
            raise ValueError(f"server.host {self.host!r} / metrics_host {self.metrics_host!r} reach beyond "
                             "loopback: set tls_cert_file + tls_key_file and auth_token_env (or auth_token), or "
                             "allow_insecure_bind: true on a private network")
        return self

    def token(self) -> str:
        """The bearer token callers must send ('' = none); from auth_token_env when named, which must be set."""
        return secret(self.auth_token, self.auth_token_env, "server.auth_token_env")


class LimitsConfig(_Strict):
    max_k: int = Field(500, ge=1, description="Largest k a Recommend may ask for.")
    default_k: int = Field(10, ge=1, description="k used when the request leaves it 0.")
    max_upsert_batch: int = Field(256, ge=1, description="Most items per UpsertItems call.")
    max_history: int = Field(200, ge=1, description="Most history items used for a user vector.")
    max_exclude_ids: int = Field(10_000, ge=0, description="Most ids in exclude_item_ids.")
    max_filters: int = Field(16, ge=0, description="Most filters per Recommend.")
    max_set_values: int = Field(1000, ge=1, description="Most values in one set-membership filter.")
    max_id_bytes: int = Field(ID_MAX_BYTES, ge=1, le=ID_MAX_BYTES,
                              description="Longest item or user id, in UTF-8 bytes (the store holds at most 256).")
    max_interactions_batch: int = Field(10_000, ge=1, description="Most events per RecordInteractions call.")
    max_delete_batch: int = Field(1_000, ge=1, description="Most ids per DeleteItems call.")
    max_future_skew_s: float = Field(
        300.0, ge=0, description="An interaction timestamp more than this many seconds ahead of the server's clock "
                                 "is refused (INVALID_ARGUMENT): it would stay the user's most recent event forever.")
    min_timestamp_s: float = Field(
        631_152_000.0, ge=0, description="Interaction timestamps before this (seconds since the epoch; default "
                                         "1990-01-01) are refused as a caller's mistake (relative seconds, a lost "
                                         "epoch offset); 0 accepts any. A timestamp of 0 means now.")


class EncoderConfig(_Strict):
    name: str = Field(description="Registry name (fusionrec.encoders.registry.ENCODERS).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the encoder class.")


class EncoderUserConfig(_Strict):
    """An encoder deployment's ``user_config``, applied to its running replicas without a restart."""

    max_batch_size: int = Field(32, ge=1, description="Most inputs per encoder batch.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill.")
    niceness: int = Field(0, ge=0, le=19, description="Process niceness of the replica, at least (0: as Ray starts "
                                                      "it, at 15 by default), e.g. 19 for an encoder swap's "
                                                      "re-encoding replica, so serving keeps the CPU.")
    encoder: EncoderConfig | None = Field(
        None, description="The encoder this deployment runs, replacing the app args' choice for its modality. "
                          "Changed in place by `fusionrec encoders swap` (its vectors must match the store's "
                          "version: a store of another version answers FAILED_PRECONDITION until swapped).")


class FusionConfig(_Strict):
    """The Fusion deployment's ``user_config``: which fusion model to serve (hot-swapped on change)."""

    name: str = Field("weighted-v0", description="Registry name (fusionrec.fusion.registry.FUSION_MODELS).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the fusion model.")
    encoder_versions: dict[str, str] = Field(
        default_factory=dict, description="modality -> encoder version the model is made for, where it differs "
                                          "from the running encoder's (set by `fusionrec encoders swap`).")


class RankingConfig(_Strict):
    """The ranking stage after candidate retrieval (fusionrec.ranking): off unless a trained ranker is named."""

    ranker_path: str = Field(
        "", description="A ranker file written by fusionrec.ranking (Ranker.save, e.g. by `fusionrec eval-ranking`); "
                        "a relative path resolves against the Retrieval replica's working folder (where the cluster "
                        "started); empty: no ranking stage (the search's order, exactly as without this section).")
    candidates_n: int = Field(100, ge=1, le=2000, description="Retrieval candidates the ranker re-scores per "
                                                              "request (k itself when k is larger). 100: on lfm2k valid "
                                                              "as good as 200 (README: The ranking stage), at half the cost.")
    mmr_lambda: float | None = Field(
        None, ge=0.0, le=1.0, description="Diversity re-rank after the ranker (MMR): 1 = ranker order, lower trades "
                                          "relevance for variety; null: no MMR.")


class RetrievalUserConfig(_Strict):
    """The Retrieval deployment's ``user_config``: applied to the running replica without a restart (its
    store and in-memory index stay loaded), e.g. a retrained ranker or the stage turned on or off."""

    ranking: RankingConfig = Field(default_factory=RankingConfig,
                                   description="Re-score the top candidates with a trained ranker (off by default).")


class StoreConfig(_Strict):
    uri: str = Field("", description="Milvus Lite file (*.db, one owner process) or a Milvus server URI "
                                     "(http://host:19530); empty: $FUSIONREC_HOME/milvus.db (.fusionrec/milvus.db).")
    token: str = Field("", description="Milvus server token (user:password), if any.")
    token_env: str = Field("", description="Name of an environment variable holding the Milvus token instead "
                                           "(keeps the secret out of the Serve config).")
    items_collection: str = Field("items")
    interactions_collection: str = Field("interactions")
    search_backend: Literal["auto", "memory", "milvus"] = Field(
        "auto", description="memory: HNSW + exact filtered search in the Retrieval replica, kept in step with "
                            "Milvus (the system of record; Milvus Lite only); milvus: search Milvus itself; auto: "
                            "memory on a Lite file, milvus on a server (where Retrieval replicas share the data).")
    consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"] = Field(
        "Strong", description="Server only: consistency of every read. Strong: a read sees every write acknowledged "
                              "before it by any replica (waits for the server's next time tick); Bounded: at most "
                              "the server's gracefulTime (5 s) stale; Session: this replica's own writes.")
    state_ttl_s: float = Field(
        1.0, gt=0, description="Server only: a replica notices another's re-index or encoder swap within this long "
                               "(at once when a request names the new model).")
    popularity_ttl_s: float = Field(
        5.0, ge=0, description="Server only: interaction counts (popular items for cold users) are recounted from "
                               "the server at most this often.")
    index_params: dict[str, int] = Field(
        default_factory=dict, description="In-memory index knobs (retrieval/ann.py): m, ef_construction, ef_search, "
                                          "ef_max, exact_max_rows, reduced_dim, reduce_at, rerank.")
    flush_every_rows: int | None = Field(
        None, ge=0, description="Flush a Milvus Lite collection after this many written rows (rows are durable in "
                                "its WAL before that); None = auto (see retrieval/lite.py), 0 = never.")
    retain_content: bool = Field(
        True, description="Keep every upserted item's raw content (text, image and audio bytes) in the content "
                          "store, so its vectors can be recomputed later (another encoder or encoder option).")
    content_uri: str = Field(
        "", description="Content store: a folder (one file per sha256), a shared path for a cluster; relative "
                        "paths resolve against the working folder; empty: $FUSIONREC_HOME/content.")

    @property
    def is_lite(self) -> bool:
        return not self.uri or self.uri.endswith(".db")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "ranking" in data:
            raise ValueError("store.ranking moved to the Retrieval deployment's user_config (applied to the running "
                             "replica without a restart): `deployments: [{name: Retrieval, user_config: {ranking: "
                             "{ranker_path: ..., candidates_n: 100}}}]`")
        return data

    @model_validator(mode="after")
    def _check_backend(self) -> "StoreConfig":
        if self.search_backend == "memory" and not self.is_lite:
            raise ValueError("store.search_backend 'memory' needs a Milvus Lite file (one owner process); with a "
                             "server the Retrieval replicas share the data and search it there: use 'auto' or 'milvus'")
        if self.token and self.token_env:
            raise ValueError("set store.token or store.token_env, not both")
        return self

    def resolved(self) -> "StoreConfig":
        """Local paths made absolute (replicas do not share the caller's working folder), defaults
        under $FUSIONREC_HOME."""
        out = self.model_copy()
        if out.is_lite:
            out.uri = str(Path(out.uri or home("milvus.db")).expanduser().resolve())
        if out.content_is_local:
            out.content_uri = str(Path(out.content_uri or home("content")).expanduser().resolve())
        return out

    @property
    def content_is_local(self) -> bool:
        """Whether ``content_uri`` is a folder path (no ``scheme://``)."""
        return "://" not in self.content_uri


class AppConfig(_Strict):
    """The `args` block of deploy/*.yaml: what `fusionrec.gateway.app:build_app` needs that is not a
    deployment setting. Replicas, resources, autoscaling and each deployment's `user_config` (encoder
    batching, the fusion model) are Serve's own `deployments:` overrides, so changing one deployment's
    settings updates that deployment only (Serve hashes `args` into every deployment's version)."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    encoders: dict[str, EncoderConfig] = Field(
        default_factory=lambda: {
            "text": EncoderConfig(name="minilm-l6-v2"),
            "image": EncoderConfig(name="efficientnet-lite0"),
            "audio": EncoderConfig(name="librosa-mel-mfcc"),
        },
        description="modality -> encoder; one Serve deployment each.",
    )
    precomputed_modalities: dict[str, int] = Field(
        default_factory=dict, description="Extra bring-your-own modalities: name -> vector dim.")
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="after")
    def _check_modalities(self) -> "AppConfig":
        unknown = set(self.encoders) - set(MODALITIES)
        if unknown:
            raise ValueError(f"encoders configured for unknown modalities {sorted(unknown)}; use {MODALITIES}")
        clash = set(self.precomputed_modalities) & set(MODALITIES)
        if clash:
            raise ValueError(f"precomputed modalities {sorted(clash)} clash with encoder modalities")
        return self


class ServeFile(BaseModel):
    """The parts of a Serve config file (deploy/*.yaml) that `fusionrec serve` reads."""

    model_config = ConfigDict(extra="allow")

    proxy_location: str = "Disabled"
    http_options: dict[str, Any] = Field(default_factory=dict)
    logging_config: dict[str, Any] = Field(default_factory=dict)
    applications: list[dict[str, Any]]

    @model_validator(mode="after")
    def _check_deployments(self) -> "ServeFile":
        check_deployment_overrides(self.app_config(), self.deployments)
        return self

    @property
    def app_name(self) -> str:
        return self.applications[0].get("name", "fusionrec")

    @property
    def deployments(self) -> list[dict[str, Any]]:
        """The first application's Serve `deployments:` overrides."""
        return list(self.applications[0].get("deployments") or [])

    def app_config(self) -> AppConfig:
        return AppConfig.model_validate(self.applications[0].get("args") or {})


def encoder_deployment_name(modality: str) -> str:
    return f"{modality.capitalize()}Encoder"


def deployment_names(cfg: AppConfig) -> list[str]:
    """Every deployment `build_app` creates for ``cfg``."""
    return ["Gateway", *(encoder_deployment_name(m) for m in cfg.encoders), "Fusion", "Retrieval"]


def _max_replicas(override: dict[str, Any]) -> int:
    if override.get("num_replicas") not in (None, "auto"):
        return int(override["num_replicas"])
    return int((override.get("autoscaling_config") or {}).get("max_replicas", 1))


#: Deployments whose ``user_config`` has its own schema (every other one is an encoder's).
USER_CONFIGS: dict[str, type[_Strict]] = {"Fusion": FusionConfig, "Retrieval": RetrievalUserConfig}


def check_deployment_overrides(cfg: AppConfig, overrides: list[dict[str, Any]]) -> None:
    """ValueError for an override Serve would silently ignore or that cannot work: an unknown
    deployment name or option, a `user_config` the deployment would refuse, or several Retrieval
    replicas on a Milvus Lite file (one owner process)."""
    from ray.serve.config import AutoscalingConfig  # Serve's own schemas: what Serve would accept
    from ray.serve.schema import DeploymentSchema

    known = deployment_names(cfg)
    for override in overrides:
        name = override.get("name")
        if name not in known:
            raise ValueError(f"deployments: unknown deployment {name!r}; this app has {known}")
        unknown = set(override) - set(DeploymentSchema.model_fields)
        if unknown:
            raise ValueError(f"deployments[{name}]: unknown options {sorted(unknown)}")
        DeploymentSchema.model_validate(override)
        if isinstance(override.get("autoscaling_config"), dict):
            AutoscalingConfig.model_validate(override["autoscaling_config"])
        if "user_config" in override:
            USER_CONFIGS.get(name, EncoderUserConfig).model_validate(override["user_config"])
        if name == "Retrieval" and _max_replicas(override) > 1 and cfg.store.is_lite:
            raise ValueError("Milvus Lite allows one owner process: Retrieval must keep one replica "
                             "unless store.uri points at a Milvus server")


def load_serve_file(path: str | Path) -> ServeFile:
    """Parse a Serve config YAML; its first application must be fusionrec's."""
    with open(path) as fh:
        return ServeFile.model_validate(yaml.safe_load(fh))
