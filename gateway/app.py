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

from fusionrec.gateway.config import AppConfig, EncoderUserConfig, FusionConfig, RetrievalUserConfig, \
    encoder_deployment_name
from fusionrec.gateway.deployments import EncoderDeployment, FusionDeployment, RetrievalDeployment, settle_heap
from fusionrec.gateway.pipeline import Recommender
from fusionrec.gateway.health import watch_deployments
from fusionrec.gateway.metrics import NO_METRICS, Metrics, serve_metrics
from fusionrec.gateway.metrics_cluster import ClusterCollector, handle_puller
from fusionrec.gateway.requestlog import serve_log_file, write_to
from fusionrec.gateway.server import create_server, port_taken, set_serving
from fusionrec.gateway.service import RecommenderServicer
from fusionrec.gateway.tracing import Tracing

log = logging.getLogger("ray.serve")  # lands in the replica log files


@serve.deployment
class Gateway:
    """Ingress: runs the grpc.aio server inside the replica and calls the other deployments by handle.

    Health turns SERVING only once every encoder, the fusion model and the store answered ready. Several
    replicas share the port (SO_REUSEPORT, server.share_port): one that starts while another already
    serves the port binds only once loaded, so that no caller meets a replica still starting up.
    """

    async def __init__(self, config: dict, encoders: dict[str, DeploymentHandle], fusion: DeploymentHandle,
                       retrieval: DeploymentHandle) -> None:
        self.config = AppConfig.model_validate(config)
        cfg = self.config.server
        self.metrics = Metrics() if cfg.metrics_enabled else None
        self._required = [*encoders.values(), fusion, retrieval]
        self.recommender = Recommender(encoders, fusion, retrieval, self.config.limits, cfg,
                                       serve.get_replica_context().app_name, self.metrics or NO_METRICS)
        self.servicer = RecommenderServicer(self.recommender, cfg.default_deadline_ms, cfg.max_call_ms)
        log_file = serve_log_file()
        if log_file:  # one JSON access line per RPC, in this replica's own log file (gateway/requestlog.py)
            write_to(log_file)
        self.tracing = Tracing.from_config(cfg)  # OTLP export when server.otlp_endpoint is set
        self.server, self.port, self.health, self.watcher = None, cfg.port, None, None
        joining = cfg.share_port and await port_taken(cfg.host, cfg.port)
        if not joining:  # the first replica: health answers NOT_SERVING while the models load
            await self._open_front_door()
        self.metrics_endpoint = self._serve_metrics(encoders, fusion, retrieval)
        self._ready = asyncio.Event()
        self._loader = asyncio.ensure_future(self._become_ready())

    async def _open_front_door(self) -> None:
        """Bind and start the gRPC server; health follows the deployments behind it from then on."""
        self.server, self.port, self.health = await create_server(self.servicer, self.config.server, self.metrics,
                                                                  tracing=self.tracing)
        # NOT_SERVING while one has no live replica; the recommender skips encoders reported down.
        self.watcher = watch_deployments(self._required, self.health, self.config.server.health_interval_s)
        self.recommender.down = self.watcher.is_down
        self.watcher.start()
        log.info("fusionrec gRPC listening on %s:%d", self.config.server.host, self.port)

    def _serve_metrics(self, encoders: dict[str, DeploymentHandle], fusion: DeploymentHandle,
                       retrieval: DeploymentHandle):
        """The one /metrics endpoint: the front door's families plus what the other replicas report."""
        cfg = self.config.server
        if self.metrics is None:
            return None
        self.metrics.registry.register(ClusterCollector(
            handle_puller(encoders, fusion, retrieval), asyncio.get_running_loop(), cfg.metrics_refresh_s,
            cfg.metrics_wait_ms / 1000))
        return serve_metrics(self.metrics.registry, cfg.metrics_host, cfg.metrics_port, cfg.metrics_port_span)

    async def _become_ready(self) -> None:
        await self.recommender.load()
        settle_heap()
        if self.server is None:  # joining replicas that already serve the port: bind now, ready at once
            await self._open_front_door()
        await set_serving(self.health, True)
        self._ready.set()
        self._refresher = asyncio.ensure_future(self.recommender.refresh_forever())  # re-indexes, swaps

    async def ready(self) -> dict[str, Any]:
        """Blocks until every model is loaded; returns where the gRPC server listens."""
        await self._ready.wait()
        return {"host": self.config.server.host, "port": self.port, "pid": os.getpid(),
                "replica_id": serve.get_replica_context().replica_id.unique_id,
                "metrics_port": self.metrics_endpoint.port if self.metrics_endpoint else None,
                "encoder_versions": self.recommender.encoder_versions,
                "model_version": self.recommender.model_version}

    async def check_health(self) -> None:
        if self._loader.done() and self._loader.exception() is not None:
            raise RuntimeError(f"dependencies failed to load: {self._loader.exception()!r}")

    async def __del__(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.server is not None:
            await set_serving(self.health, False)
            await self.server.stop(self.config.server.grace_period_s)
        self.tracing.shutdown()  # export the spans still buffered
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()


#: Code defaults of every deployment's options. A Serve config's `deployments:` list overrides any of
#: them by name (Serve merges the two; `serve run`/`serve deploy` apply it, and so does
#: `deployment_options` for the benchmarks' imperative apps). Fractional CPUs: Serve's default of one
#: CPU per replica leaves replicas STARTING forever on 2 cores.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    # Two front doors sharing the port (server.share_port): losing one leaves the port answering.
    "Gateway": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 1024, "num_replicas": 2},
    "Fusion": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 256, "max_queued_requests": 512,
               "user_config": FusionConfig().model_dump()},
    "Retrieval": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 256, "max_queued_requests": 512,
                  "user_config": RetrievalUserConfig().model_dump()},
}
#: max_queued_requests: bounded queues in every caller's handle (Serve's default is unbounded); beyond it
#: Serve raises BackPressureError, answered RESOURCE_EXHAUSTED with retry advice (gateway/errors.py).
ENCODER_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 64, "max_queued_requests": 256,
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                           "upscale_delay_s": 1.0, "downscale_delay_s": 5.0},
    "user_config": EncoderUserConfig().model_dump(exclude_none=True),
}


def deployment_options(name: str, overrides: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Options for Deployment.options(): the code defaults, then the Serve config's override of
    ``name`` if any, merged per top-level key as Serve merges them."""
    options = dict(DEFAULT_OPTIONS.get(name, ENCODER_OPTIONS)) | {"name": name}
    for override in overrides or []:
        if override.get("name") == name:
            options |= override
    return options


def build_app(args: dict[str, Any]) -> Application:
    """Typed app builder: `args` is an AppConfig as a dict (the `args` block of deploy/*.yaml);
    deployment settings come from the config's `deployments:` list, applied by Serve."""
    cfg = AppConfig.model_validate(args)
    cfg.store = cfg.store.resolved()
    if cfg.store.is_lite:
        os.makedirs(Path(cfg.store.uri).parent, exist_ok=True)
    encoders = {m: EncoderDeployment.options(**deployment_options(encoder_deployment_name(m))).bind(m, enc.model_dump())
                for m, enc in cfg.encoders.items()}
    fusion = FusionDeployment.options(**deployment_options("Fusion")).bind(encoders, cfg.precomputed_modalities)
    retrieval = RetrievalDeployment.options(**deployment_options("Retrieval")).bind(
        cfg.store.model_dump(), encoders, fusion, cfg.precomputed_modalities)
    return Gateway.options(**deployment_options("Gateway")).bind(gateway_args(cfg), encoders, fusion, retrieval)


def gateway_args(cfg: AppConfig) -> dict[str, Any]:
    """Only what the Gateway uses, so that changing e.g. the fusion model does not restart it."""
    return cfg.model_dump(include={"server", "limits"})
