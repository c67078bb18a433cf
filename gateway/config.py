"""Typed configuration of the fusionrec application (the `args` of the Serve config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fusionrec.core.rules import ID_MAX_BYTES
from fusionrec.encoders.base import MODALITIES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Interface the gRPC front door binds; keep loopback unless fronted by a proxy.")
    port: int = Field(9000, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    auth_token: str = Field("", description="If set, callers must send `authorization: Bearer <token>`.")
    max_inflight_requests: int = Field(256, ge=1, description="Beyond this many concurrent RPCs the gateway answers RESOURCE_EXHAUSTED.")
    max_message_mb: int = Field(64, ge=1, description="Largest request accepted, in MiB.")
    default_deadline_ms: int = Field(5000, ge=1, description="Deadline applied when the caller sets none.")
    ranking_reserve_ms: int = Field(50, ge=0, description="Time kept back from encoders for retrieval and ranking.")
    grace_period_s: float = Field(5.0, ge=0, description="In-flight RPCs get this long to finish on shutdown.")


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


class EncoderConfig(_Strict):
    name: str = Field(description="Registry name (fusionrec.encoders.registry.ENCODERS).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the encoder class.")


class DeploymentConfig(_Strict):
    """Serve settings of one deployment."""

    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per replica; fractional, since 2 cores must hold the whole app.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractional allowed).")
    min_replicas: int = Field(1, ge=0, description="Autoscaling floor (equal to max_replicas: fixed count, no autoscaling).")
    max_replicas: int = Field(1, ge=1, description="Autoscaling ceiling.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Autoscaling target per replica; batching encoders want it high enough for batches to form.")
    upscale_delay_s: float = Field(1.0, ge=0, description="How long demand must stay above target before adding a replica.")
    downscale_delay_s: float = Field(5.0, ge=0, description="How long demand must stay below target before removing one.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica takes at once (batches form from these).")
    max_batch_size: int = Field(32, ge=1, description="@serve.batch size (encoders only).")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="@serve.batch wait (encoders only).")

    @model_validator(mode="after")
    def _replicas_ordered(self) -> "DeploymentConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for Deployment.options()."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.min_replicas == self.max_replicas:
            opts["num_replicas"] = self.min_replicas
        else:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            }
        return opts


def _encoder_deployment() -> DeploymentConfig:
    return DeploymentConfig(num_cpus=0.25, max_replicas=2)


class DeploymentsConfig(_Strict):
    gateway: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.1, max_ongoing_requests=1024))
    text_encoder: DeploymentConfig = Field(default_factory=_encoder_deployment)
    image_encoder: DeploymentConfig = Field(default_factory=_encoder_deployment)
    audio_encoder: DeploymentConfig = Field(default_factory=_encoder_deployment)
    fusion: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.1, max_ongoing_requests=256))
    retrieval: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.1, max_ongoing_requests=256))


class FusionConfig(_Strict):
    name: str = Field("weighted-v0", description="Registry name (fusionrec.fusion.registry.FUSION_MODELS).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the fusion model.")


class StoreConfig(_Strict):
    uri: str = Field(".fusionrec/milvus.db", description="Milvus Lite file (*.db, one owner process) or a Milvus server URI (http://host:19530).")
    token: str = Field("", description="Milvus server token (user:password), if any.")
    items_collection: str = Field("items")
    interactions_collection: str = Field("interactions")
    search_backend: Literal["memory", "milvus"] = Field(
        "memory", description="memory: HNSW + exact filtered search in the Retrieval replica, kept in step with "
                              "Milvus (the system of record); milvus: search Milvus itself.")
    index_params: dict[str, int] = Field(
        default_factory=dict, description="In-memory index knobs: m, ef_construction, ef_search, ef_max, exact_max_rows.")
    flush_every_rows: int | None = Field(
        None, ge=0, description="Flush a Milvus Lite collection after this many written rows (rows are durable in "
                                "its WAL before that); None = auto (see gateway/store/lite.py), 0 = never.")

    @property
    def is_lite(self) -> bool:
        return self.uri.endswith(".db")


class AppConfig(_Strict):
    """Everything `fusionrec.gateway.app:build_app` needs; the `args` block of deploy/*.yaml."""

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
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    deployments: DeploymentsConfig = Field(default_factory=DeploymentsConfig)

    @model_validator(mode="after")
    def _check_modalities(self) -> "AppConfig":
        unknown = set(self.encoders) - set(MODALITIES)
        if unknown:
            raise ValueError(f"encoders configured for unknown modalities {sorted(unknown)}; use {MODALITIES}")
        clash = set(self.precomputed_modalities) & set(MODALITIES)
        if clash:
            raise ValueError(f"precomputed modalities {sorted(clash)} clash with encoder modalities")
        if self.deployments.retrieval.max_replicas > 1 and self.store.is_lite:
            raise ValueError("Milvus Lite allows one owner process: retrieval.max_replicas must be 1 "
                             "unless store.uri points at a Milvus server")
        return self


class ServeFile(BaseModel):
    """The parts of a Serve config file (deploy/*.yaml) that `fusionrec serve` reads."""

    model_config = ConfigDict(extra="allow")

    proxy_location: str = "Disabled"
    http_options: dict[str, Any] = Field(default_factory=dict)
    logging_config: dict[str, Any] = Field(default_factory=dict)
    applications: list[dict[str, Any]]

    @property
    def app_name(self) -> str:
        return self.applications[0].get("name", "fusionrec")

    def app_config(self) -> AppConfig:
        return AppConfig.model_validate(self.applications[0].get("args") or {})


def load_serve_file(path: str | Path) -> ServeFile:
    """Parse a Serve config YAML; its first application must be fusionrec's."""
    with open(path) as fh:
        return ServeFile.model_validate(yaml.safe_load(fh))
