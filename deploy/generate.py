"""The deploy files generated from the shipped Serve configs, committed beside them, and the check that
they are current (`fusionrec deploy generate [--check]`, tests/unit/test_deploy_kit.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fusionrec.deploy.rayservice import KubeRayOptions, manifest_objects
from fusionrec.deploy.variants import container_config, milvus_server_config
from fusionrec.deploy.yamlfmt import to_yaml


def _generated_from(base: str, module: str) -> str:
    return f"# Generated from {base} by deploy/{module}.py: edit those, then run `fusionrec deploy generate`.\n"


def serve_file(config: dict[str, Any], what: str, base: str, module: str = "variants") -> str:
    header = f"# {what}\n" + _generated_from(base, module)
    return header + to_yaml(config)


def kuberay_manifest(opts: KubeRayOptions) -> str:
    base = "deploy/gpu.yaml" if opts.gpu else "deploy/local.yaml"
    header = (f"# fusionrec on KubeRay: volume claim, RayService (serveConfigV2 = {base} for a cluster), gRPC Services.\n"
              + _generated_from(base, "rayservice") +
              "# Needs deploy/milvus/milvus-standalone.yaml in the same namespace. README: Deploying.\n")
    return header + to_yaml(*manifest_objects(opts))


#: Path in the checkout -> its text. Every entry is checked by `fusionrec deploy generate --check`.
GENERATED: dict[str, Callable[[], str]] = {
    "deploy/docker/serve.yaml": lambda: serve_file(
        container_config(), "Serve config of the CPU image (deploy/docker/Dockerfile): ports on every interface "
                            "of the container.", "deploy/local.yaml"),
    "deploy/docker/serve-gpu.yaml": lambda: serve_file(
        container_config(gpu=True), "Serve config of the GPU image (deploy/docker/Dockerfile.gpu): ports on every "
                                    "interface of the container.", "deploy/gpu.yaml"),
    "deploy/milvus/serve.yaml": lambda: serve_file(
        milvus_server_config(), "The local config on a Milvus server (deploy/milvus/docker-compose.yml) instead "
                                "of a Milvus Lite file.", "deploy/local.yaml"),
    "deploy/kuberay/rayservice.yaml": lambda: kuberay_manifest(KubeRayOptions()),
    "deploy/kuberay/rayservice-gpu.yaml": lambda: kuberay_manifest(KubeRayOptions.for_gpu()),
}


def write_all(root: Path) -> list[Path]:
    """Write every generated file under ``root`` (a checkout); returns the paths written."""
    written = []
    for rel, render in GENERATED.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render())
        written.append(path)
    return written


def stale(root: Path) -> list[str]:
    """The generated files under ``root`` that are missing or differ from what generation gives now."""
    return [rel for rel, render in GENERATED.items()
            if not (root / rel).is_file() or (root / rel).read_text() != render()]
