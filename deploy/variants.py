"""Serve configs derived from the shipped ones (deploy/local.yaml, deploy/gpu.yaml) for other places to
run: a container, a Milvus server, a Kubernetes cluster. Each is the base file plus a few overrides
(`gateway.runtime.render_config`), so a setting changed in the base reaches every variant when
`fusionrec deploy generate` runs again; `--check` (and tests/unit/test_deploy_kit.py) fail until then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fusionrec.core.paths import packaged_config

#: Where the images keep state (FUSIONREC_HOME): the checkpoints, the content store. A volume in a
#: container, a shared (ReadWriteMany) PersistentVolumeClaim on Kubernetes.
DATA_DIR = "/data/fusionrec"
#: Custom Ray resource that only the gateway pods advertise: the Gateway replicas (and the gRPC port)
#: land there and nowhere else, so the Kubernetes Service and the readiness probe know their pods.
GATEWAY_RESOURCE = "fusionrec_gateway"
#: The modality encoder deployments of the shipped configs.
ENCODER_DEPLOYMENTS = ("TextEncoder", "ImageEncoder", "AudioEncoder")


class ClusterSizing(BaseModel):
    """How the Serve app is spread over a Ray cluster on Kubernetes (serveConfigV2 of the RayService)."""

    model_config = ConfigDict(extra="forbid")

    gateway_replicas: int = Field(2, ge=1, description="Gateway replicas = gateway pods, one gRPC front door each.")
    encoder_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per encoder replica (a whole core on "
                                                           "a cluster node; the 2-core local config uses 0.25).")
    encoder_max_replicas: int = Field(4, ge=1, description="Autoscaling ceiling of each encoder deployment.")
    milvus_uri: str = Field("http://fusionrec-milvus:19530", description="Milvus server the Retrieval replicas "
                                                                        "share (deploy/milvus/milvus-standalone.yaml).")
    grpc_port: int = Field(9000, ge=1, le=65535, description="gRPC port of every Gateway replica.")
    metrics_port: int = Field(9464, ge=1, le=65535, description="Prometheus port of every Gateway replica.")


#: Environment variable of the gateway pods that holds the API token (from the Secret TOKEN_SECRET).
TOKEN_ENV = "FUSIONREC_TOKEN"
TOKEN_SECRET = "fusionrec-token"


def base_config(gpu: bool = False) -> Path:
    """The shipped Serve config a variant starts from."""
    return packaged_config("gpu.yaml" if gpu else "local.yaml")


def container_config(gpu: bool = False) -> dict[str, Any]:
    """`fusionrec serve` inside a container: the gRPC and metrics ports on every interface of the
    container. Plaintext and no token are allowed explicitly: publish the ports on 127.0.0.1 (`-p
    127.0.0.1:9000:9000`), or mount a certificate and set tls_cert_file/tls_key_file and auth_token_env."""
    from fusionrec.gateway.runtime import render_config

    return render_config(base_config(gpu), {"server": {"host": "0.0.0.0", "metrics_host": "0.0.0.0",
                                                       "allow_insecure_bind": True}})


def milvus_server_config(uri: str = "http://127.0.0.1:19530") -> dict[str, Any]:
    """The local config with the store on a Milvus server (deploy/milvus/docker-compose.yml) instead
    of a Milvus Lite file."""
    from fusionrec.gateway.runtime import render_config

    return render_config(base_config(), {"store": {"uri": uri}})


def cluster_config(gpu: bool = False, sizing: ClusterSizing | None = None) -> dict[str, Any]:
    """serveConfigV2 of the RayService: ports on the pod IP (kubelet probes and the Service reach it
    there), the store on a Milvus server with content on the shared volume, Gateway replicas pinned
    to the gateway pods by a custom resource (num_cpus 0: those pods run nothing else), whole
    cores per encoder replica. Everything else, including runtime_env, comes from the base file."""
    from fusionrec.gateway.runtime import render_config

    sizing = sizing or ClusterSizing()
    base = {d["name"]: d for d in render_config(base_config(gpu))["applications"][0]["deployments"]}
    deployments: dict[str, dict[str, Any]] = {"Gateway": {
        "num_replicas": sizing.gateway_replicas,
        "ray_actor_options": {"num_cpus": 0, "resources": {GATEWAY_RESOURCE: 1}}}}
    for name in ENCODER_DEPLOYMENTS:
        entry = base.get(name, {})
        deployments[name] = {
            "ray_actor_options": {**entry.get("ray_actor_options", {}), "num_cpus": sizing.encoder_num_cpus},
            "autoscaling_config": {**entry.get("autoscaling_config", {}), "max_replicas": sizing.encoder_max_replicas}}
    overrides = {
        # Plaintext inside the cluster (a mesh or the ingress ends TLS), but a token is required: it comes
        # from a Kubernetes Secret through the gateway pods' environment, never from the Serve config.
        "server": {"host": "0.0.0.0", "port": sizing.grpc_port, "allow_insecure_bind": True,
                   "auth_token_env": TOKEN_ENV,
                   "metrics_host": "0.0.0.0", "metrics_port": sizing.metrics_port},
        "store": {"uri": sizing.milvus_uri, "content_uri": f"{DATA_DIR}/content"},
        "deployments": deployments,
    }
    return render_config(base_config(gpu), overrides)
