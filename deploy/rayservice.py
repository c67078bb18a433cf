"""The KubeRay manifest: a RayService (ray.io/v1) whose serveConfigV2 is `variants.cluster_config`, the
Services in front of the gRPC port, and the shared volume.

Which pod serves port 9000: the gRPC front door runs inside each Gateway replica, and Serve may put a
replica on any Ray node. So the manifest gives the Gateway pods of their own: a `gateway` worker
group whose pods advertise the custom Ray resource `fusionrec_gateway: 1` and no CPUs, while the
Gateway deployment asks for exactly that resource and 0 CPUs. Each gateway pod then runs one Gateway
replica and nothing else, the Service selects those pods by label, and their readiness is the
front door's own grpc.health.v1 (Kubernetes' native `grpc:` probe on 9000): a pod receives traffic
only while its Gateway says SERVING. Not the head pod: KubeRay deploys serveConfigV2 only once the
head pod is ready, so a head gated on the Gateway's health would never become ready. Model pods
(encoders, Fusion, Retrieval) are gated on their raylet's health instead of KubeRay's default
probe, which waits for Serve's HTTP proxy (disabled here: `proxy_location: Disabled`).
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fusionrec.deploy.variants import (DATA_DIR, GATEWAY_RESOURCE, TOKEN_ENV, TOKEN_SECRET, ClusterSizing,
                                       cluster_config)
from fusionrec.deploy.yamlfmt import to_yaml

#: Ray's dashboard agent port and its raylet health route (what KubeRay's own probes call).
RAYLET_HEALTH = {"path": "/api/local_raylet_healthz", "port": 52365}
GRPC_HEALTH_SERVICE = "fusionrec.v1.Recommender"
RAY_USER_GID = 100  # group `users` of the rayproject/ray images: lets the ray user write the volume


class KubeRayOptions(BaseModel):
    """Pod sizes and names of the generated manifest (`fusionrec deploy kuberay --help` sets them)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("fusionrec", description="RayService name; prefixes the Services and the volume claim.")
    image: str = Field("", description="Image of every Ray pod (deploy/docker/Dockerfile[.gpu]); empty: "
                                       "fusionrec:<version>[-gpu].")
    gpu: bool = Field(False, description="GPU model pods and deploy/gpu.yaml as the base Serve config.")
    sizing: ClusterSizing = Field(default_factory=ClusterSizing)
    head_cpus: int = Field(2, ge=1, description="CPU cores of the head pod (GCS, dashboard, Serve controller).")
    head_memory_gib: int = Field(8, ge=1, description="Memory of the head pod, GiB.")
    gateway_cpus: int = Field(1, ge=1, description="CPU cores of each gateway pod (one Gateway replica).")
    gateway_memory_gib: int = Field(4, ge=1, description="Memory of each gateway pod, GiB.")
    model_cpus: int = Field(4, ge=1, description="CPU cores of each model pod (encoders, Fusion, Retrieval).")
    model_memory_gib: int = Field(16, ge=1, description="Memory of each model pod, GiB.")
    model_gpus: int = Field(0, ge=0, description="GPUs of each model pod (nvidia.com/gpu).")
    model_pods_min: int = Field(1, ge=1, description="Fewest model pods (the autoscaler keeps at least these).")
    model_pods_max: int = Field(4, ge=1, description="Most model pods the Ray autoscaler may start.")
    data_volume_gib: int = Field(20, ge=1, description="Shared volume (ReadWriteMany) at FUSIONREC_HOME: "
                                                       "checkpoints and the content store.")

    @classmethod
    def for_gpu(cls, **fields: Any) -> "KubeRayOptions":
        """GPU defaults: one GPU per model pod, more cores and memory beside it."""
        return cls(**({"gpu": True, "model_gpus": 1, "model_cpus": 8, "model_memory_gib": 32} | fields))

    def image_ref(self) -> str:
        return self.image or f"fusionrec:{version('fusionrec')}{'-gpu' if self.gpu else ''}"


def manifest_objects(opts: KubeRayOptions) -> list[dict[str, Any]]:
    """Every object to `kubectl apply`: volume claim, RayService, Services."""
    return [data_claim(opts), rayservice(opts), *gateway_services(opts)]


def rayservice(opts: KubeRayOptions) -> dict[str, Any]:
    serve_config = to_yaml(cluster_config(opts.gpu, opts.sizing))
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": opts.name, "labels": _labels(opts)},
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},  # zero-downtime: a new cluster, then the switch
            "serveConfigV2": serve_config,
            "rayClusterConfig": {
                "rayVersion": version("ray"),
                "enableInTreeAutoscaling": True,  # model pods follow the encoders' replica demand
                "authOptions": {"mode": "token"},  # Ray's token auth; KubeRay keeps the token in a Secret
                "headGroupSpec": {
                    # No replicas on the head: GCS and the Serve controller keep its cores.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(opts, "head", opts.head_cpus, opts.head_memory_gib),
                },
                "workerGroupSpecs": [_gateway_group(opts), _model_group(opts)],
            },
        },
    }


def _gateway_group(opts: KubeRayOptions) -> dict[str, Any]:
    n = opts.sizing.gateway_replicas
    template = _pod(opts, "gateway", opts.gateway_cpus, opts.gateway_memory_gib)
    container = template["spec"]["containers"][0]
    # The Gateway reads its token from here (server.auth_token_env): `kubectl create secret generic
    # fusionrec-token --from-literal=token=...` before applying.
    container["env"].append({"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": "token"}}})
    container["ports"] = [{"name": "grpc", "containerPort": opts.sizing.grpc_port},
                          {"name": "metrics", "containerPort": opts.sizing.metrics_port}]
    # SERVING only once every encoder, the fusion model and the store answered; NOT_SERVING while a
    # deployment behind it has no replica: the pod leaves the Service until it is back.
    container["readinessProbe"] = {"grpc": {"port": opts.sizing.grpc_port, "service": GRPC_HEALTH_SERVICE},
                                   "initialDelaySeconds": 10, "periodSeconds": 5, "timeoutSeconds": 2,
                                   "failureThreshold": 3}
    return {"groupName": "gateway", "replicas": n, "minReplicas": n, "maxReplicas": n,
            # rayStartParams values are strings; `resources` is the JSON ray start --resources takes.
            "rayStartParams": {"num-cpus": "0", "resources": f'"{{\\"{GATEWAY_RESOURCE}\\": 1}}"'},
            "template": template}


def _model_group(opts: KubeRayOptions) -> dict[str, Any]:
    template = _pod(opts, "models", opts.model_cpus, opts.model_memory_gib, opts.model_gpus)
    template["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": RAYLET_HEALTH, "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 10}
    return {"groupName": "gpu-models" if opts.gpu else "models", "replicas": opts.model_pods_min,
            "minReplicas": opts.model_pods_min, "maxReplicas": max(opts.model_pods_min, opts.model_pods_max),
            "rayStartParams": {}, "template": template}


def _pod(opts: KubeRayOptions, component: str, cpus: int, memory_gib: int, gpus: int = 0) -> dict[str, Any]:
    """Pod template: the image, the app's environment, requests = limits (Ray sizes itself from the
    limits), the shared volume at FUSIONREC_HOME and a memory-backed /dev/shm for the object store."""
    from fusionrec.gateway.runtime import RUNTIME_ENV_DEFAULTS

    resources = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    env = [{"name": k, "value": v} for k, v in {**RUNTIME_ENV_DEFAULTS, "FUSIONREC_HOME": DATA_DIR}.items()]
    container = {"name": "ray-head" if component == "head" else "ray-worker", "image": opts.image_ref(),
                 "env": env, "resources": {"requests": resources, "limits": resources},
                 "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}, {"name": "dshm", "mountPath": "/dev/shm"}]}
    return {"metadata": {"labels": _labels(opts, component)},
            "spec": {"securityContext": {"fsGroup": RAY_USER_GID}, "containers": [container],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": f"{opts.name}-data"}},
                                 {"name": "dshm", "emptyDir": {"medium": "Memory"}}]}}


def gateway_services(opts: KubeRayOptions) -> list[dict[str, Any]]:
    """A ClusterIP Service (gRPC + metrics) over the ready gateway pods, and a headless one for
    clients that balance per call (`dns:///<name>-grpc-headless:9000`, round_robin): a ClusterIP
    balances connections, and a gRPC channel keeps one."""
    selector = _labels(opts, "gateway")
    grpc = {"name": "grpc", "port": opts.sizing.grpc_port, "targetPort": "grpc", "appProtocol": "grpc"}
    metrics = {"name": "metrics", "port": opts.sizing.metrics_port, "targetPort": "metrics", "appProtocol": "http"}
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{opts.name}-grpc", "labels": _labels(opts)},
         "spec": {"type": "ClusterIP", "selector": selector, "ports": [grpc, metrics]}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": f"{opts.name}-grpc-headless", "labels": _labels(opts)},
         "spec": {"clusterIP": "None", "selector": selector, "ports": [grpc]}},
    ]


def data_claim(opts: KubeRayOptions) -> dict[str, Any]:
    """FUSIONREC_HOME for every pod: Retrieval's content store and the fusion checkpoints must be the
    same files wherever a replica lands (ReadWriteMany: NFS, CephFS, EFS, Filestore ...)."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{opts.name}-data", "labels": _labels(opts)},
            "spec": {"accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": f"{opts.data_volume_gib}Gi"}}}}


def _labels(opts: KubeRayOptions, component: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "fusionrec", "app.kubernetes.io/instance": opts.name}
    return labels | ({"app.kubernetes.io/component": component} if component else {})
