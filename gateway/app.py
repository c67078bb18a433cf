"""The Serve application: Gateway ingress (gRPC front door) wired to encoders, fusion, retrieval.

`serve run deploy/local.yaml` and `fusionrec serve` both build it through `build_app`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from fusionrec.gateway.config import AppConfig, DeploymentConfig
from fusionrec.gateway.deployments import (EncoderDeployment, FusionDeployment, RetrievalDeployment,
                                 encoder_deployment_name, settle_heap)
from fusionrec.gateway.pipeline import Recommender
from fusionrec.gateway.server import create_server, set_serving
from fusionrec.gateway.service import RecommenderServicer

log = logging.getLogger("ray.serve")  # lands in the replica log files


@serve.deployment
class Gateway:
    """Ingress: runs the grpc.aio server inside the replica and calls the other deployments by handle.

    Health turns SERVING only once every encoder, the fusion model and the store answered ready.
    """

    async def __init__(self, config: dict, encoders: dict[str, DeploymentHandle], fusion: DeploymentHandle,
                       retrieval: DeploymentHandle) -> None:
        self.config = AppConfig.model_validate(config)
        self.recommender = Recommender(encoders, fusion, retrieval, self.config.limits, self.config.server)
        servicer = RecommenderServicer(self.recommender, self.config.server.default_deadline_ms)
        self.server, self.port, self.health = await create_server(servicer, self.config.server)
        self._ready = asyncio.Event()
        self._loader = asyncio.ensure_future(self._become_ready())
        log.info("fusionrec gRPC listening on %s:%d", self.config.server.host, self.port)

    async def _become_ready(self) -> None:
        await self.recommender.load()
        settle_heap()
        await set_serving(self.health, True)
        self._ready.set()

    async def ready(self) -> dict[str, Any]:
        """Blocks until every model is loaded; returns where the gRPC server listens."""
        await self._ready.wait()
        return {"host": self.config.server.host, "port": self.port,
                "encoder_versions": self.recommender.encoder_versions,
                "model_version": self.recommender.model_version}

    async def check_health(self) -> None:
        if self._loader.done() and self._loader.exception() is not None:
            raise RuntimeError(f"dependencies failed to load: {self._loader.exception()!r}")

    async def __del__(self) -> None:
        await set_serving(self.health, False)
        await self.server.stop(self.config.server.grace_period_s)


def _options(dep: DeploymentConfig, name: str, batching: bool = False) -> dict[str, Any]:
    opts = dep.serve_options() | {"name": name}
    if batching:
        opts["user_config"] = {"max_batch_size": dep.max_batch_size, "batch_wait_timeout_s": dep.batch_wait_timeout_s}
    return opts


def build_app(args: dict[str, Any]) -> Application:
    """Typed app builder: `args` is an AppConfig as a dict (the `args` block of deploy/*.yaml)."""
    cfg = AppConfig.model_validate(args)
    if cfg.store.is_lite:  # replicas do not share the caller's working directory
        cfg.store.uri = str(Path(cfg.store.uri).expanduser().resolve())
        os.makedirs(Path(cfg.store.uri).parent, exist_ok=True)
    deployments = cfg.deployments
    encoders = {}
    for modality, enc in cfg.encoders.items():
        dep: DeploymentConfig = getattr(deployments, f"{modality}_encoder")
        options = dict(enc.options)
        if dep.num_gpus > 0:
            options.setdefault("device", "cuda")
        encoders[modality] = EncoderDeployment.options(**_options(dep, encoder_deployment_name(modality), True)).bind(
            modality, enc.model_copy(update={"options": options}).model_dump())
    fusion = FusionDeployment.options(**_options(deployments.fusion, "Fusion") | {"user_config": cfg.fusion.model_dump()}
                                      ).bind(encoders, cfg.precomputed_modalities)
    retrieval = RetrievalDeployment.options(**_options(deployments.retrieval, "Retrieval")).bind(
        cfg.store.model_dump(), encoders, fusion, cfg.precomputed_modalities)
    return Gateway.options(**_options(deployments.gateway, "Gateway")).bind(
        gateway_args(cfg), encoders, fusion, retrieval)


def gateway_args(cfg: AppConfig) -> dict[str, Any]:
    """Only what the Gateway uses, so that changing e.g. the fusion model does not restart it."""
    return cfg.model_dump(include={"server", "limits"})
