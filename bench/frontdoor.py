"""Front door comparison: Serve's native gRPC proxy vs the grpc.aio server inside the Gateway replica.

Both run the same Recommender logic over the same no-op deployments (the floor), under the same load.
"""

from __future__ import annotations

import time
from typing import Any

from ray import serve
from ray.serve import Application

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.gateway import convert
from fusionrec.bench.floor import build_floor_app
from fusionrec.gateway.config import AppConfig
from fusionrec.gateway.pipeline import Recommender

SERVICER_FUNCTION = "fusionrec.v1.recommender_pb2_grpc.add_RecommenderServicer_to_server"


@serve.deployment
class ProxiedGateway:
    """Ingress for Serve's gRPC proxy: the proxy calls the method named after the RPC."""

    def __init__(self, config: dict, encoders: dict, fusion: Any, retrieval: Any) -> None:
        cfg = AppConfig.model_validate(config)
        self.recommender = Recommender(encoders, fusion, retrieval, cfg.limits, cfg.server)
        self.deadline_s = cfg.server.default_deadline_ms / 1000
        self._loaded = False

    async def Recommend(self, request: pb.RecommendRequest) -> pb.RecommendResponse:
        if not self._loaded:
            await self.recommender.load()
            self._loaded = True
        rec = await self.recommender.recommend(convert.recommend_from_pb(request), time.monotonic() + self.deadline_s)
        return convert.recommendation_to_pb(rec)


def build_proxied_floor_app(args: dict[str, Any], deployments: list[dict[str, Any]]) -> Application:
    return build_floor_app(args, deployments, ingress=ProxiedGateway)


def start_proxied(config_path, port: int, proxy_num_cpus_note: str = "") -> None:
    """Start Ray + Serve with the native gRPC proxy on 127.0.0.1:port and deploy the proxied floor."""
    import os

    import ray

    from fusionrec.gateway.config import load_serve_file
    from fusionrec.gateway.runtime import RUNTIME_ENV_DEFAULTS

    for key, value in RUNTIME_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    serve_file = load_serve_file(config_path)
    ray.init(include_dashboard=False, log_to_driver=False, namespace="fusionrec")
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1"},
                grpc_options={"port": port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
                logging_config=serve_file.logging_config or None)
    # Only applications with a route prefix are reachable through the proxy.
    serve.run(build_proxied_floor_app(serve_file.applications[0].get("args") or {}, serve_file.deployments),
              name="fusionrec",
              route_prefix="/", logging_config=serve_file.logging_config or None)
