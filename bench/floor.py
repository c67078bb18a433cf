"""The framework's floor: the real Gateway over no-op deployments with the same hops and payload sizes."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from ray import serve
from ray.serve import Application

from fusionrec.gateway.app import Gateway, deployment_options, gateway_args
from fusionrec.gateway.config import AppConfig, encoder_deployment_name
from fusionrec.gateway.domain import Ranked
from fusionrec.retrieval.base import Candidate, StoreSchema

ENCODER_DIMS = {"text": 384, "image": 1280, "audio": 174}


def _unit(dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@serve.deployment
class NoopEncoder:
    def __init__(self, modality: str) -> None:
        self.modality = modality
        self.vec = _unit(ENCODER_DIMS[modality], 1)

    def info(self) -> dict[str, Any]:
        return {"name": "noop", "version": "noop@1", "modality": self.modality, "dim": self.vec.size}

    async def encode(self, content: Any) -> np.ndarray:
        return self.vec


@serve.deployment
class NoopFusion:
    def __init__(self, dim: int) -> None:
        self.vec = _unit(dim, 2)

    def info(self) -> dict[str, Any]:
        return {"version": "noop@1", "dim": self.vec.size, "modality_dims": ENCODER_DIMS}


@serve.deployment
class NoopRetrieval:
    """Answers with fixed candidates shaped like real ones (fused vectors + attributes)."""

    def __init__(self, dim: int, max_k: int) -> None:
        rng = np.random.default_rng(3)
        vecs = rng.standard_normal((max_k, dim)).astype(np.float32)
        self.candidates = [Candidate(item_id=f"item-{i:06d}", score=0.0, fused=vecs[i],
                                     attributes={"category": "cat", "mood": "calm", "year": 2001.0, "price": 9.5,
                                                 "explicit": False}) for i in range(max_k)]
        self.schema = StoreSchema(modality_dims=ENCODER_DIMS, fused_dim=dim,
                                  encoder_versions={m: "noop@1" for m in ENCODER_DIMS}, model_version="noop@1")

    def info(self) -> dict[str, Any]:
        return asdict(self.schema)

    def swaps(self) -> dict[str, str]:
        return {}

    async def recommend(self, q, query: dict, model_version: str, history_limit: int,
                        query_versions: dict | None = None) -> Ranked:
        """The same answer shape as RetrievalDeployment.recommend, with no work."""
        chosen = self.candidates[:q.k]
        zeros = np.zeros(len(chosen), np.float32)
        return Ranked(chosen, zeros.tolist(), {m: zeros for m in ENCODER_DIMS}, True)


def build_floor_app(args: dict[str, Any], deployments: list[dict[str, Any]] | None = None, fused_dim: int = 768,
                    ingress: Any = Gateway) -> Application:
    """Same deployments, names, resources and hops as fusionrec.gateway.app.build_app, with no work inside.

    deployments: the Serve config's `deployments:` overrides (resources, replicas), applied here since
        this app is deployed imperatively; `user_config`s are left out (the no-op classes take none).
    ingress: the ingress deployment class (the frontdoor benchmark swaps in Serve's proxy path).
    """
    cfg = AppConfig.model_validate(args)
    overrides = [{k: v for k, v in d.items() if k != "user_config"} for d in deployments or []]

    def options(name: str) -> dict[str, Any]:
        return {k: v for k, v in deployment_options(name, overrides).items() if k != "user_config"}

    encoders = {m: NoopEncoder.options(**options(encoder_deployment_name(m))).bind(m) for m in cfg.encoders}
    fusion = NoopFusion.options(**options("Fusion")).bind(fused_dim)
    retrieval = NoopRetrieval.options(**options("Retrieval")).bind(fused_dim, cfg.limits.max_k)
    return ingress.options(**options("Gateway")).bind(gateway_args(cfg), encoders, fusion, retrieval)
