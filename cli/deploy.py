"""`fusionrec deploy`: the deploy kit's generated files, a KubeRay manifest for your own image and sizes,
and the health probe the container images run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

deploy_app = typer.Typer(help="Deploy kit: Docker, KubeRay and Milvus server files (README: Deploying).",
                         no_args_is_help=True)


@deploy_app.command("generate")
def generate(root: Path = typer.Option(Path("."), help="The checkout to write into (its deploy/ folder)."),
             check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 if a file is stale.")) -> None:
    """Regenerate the files derived from deploy/local.yaml and deploy/gpu.yaml: the containers' Serve
    configs, the Milvus-server config, the KubeRay manifests (CPU and GPU)."""
    from fusionrec.deploy.generate import GENERATED, stale, write_all

    if check:
        outdated = stale(root)
        for rel in outdated:
            typer.echo(f"stale: {rel}", err=True)
        if outdated:
            typer.echo("run `fusionrec deploy generate` and commit the result", err=True)
            raise typer.Exit(1)
        typer.echo(f"{len(GENERATED)} generated deploy files are current")
        return
    for path in write_all(root):
        typer.echo(f"wrote {path}")


@deploy_app.command("kuberay")
def kuberay(image: str = typer.Option("", help="Image of every Ray pod (default fusionrec:<version>[-gpu])."),
            gpu: bool = typer.Option(False, "--gpu", help="GPU model pods, deploy/gpu.yaml as the base."),
            name: str = typer.Option("fusionrec", help="RayService name (prefixes the Services and the claim)."),
            options: str = typer.Option("{}", help="More KubeRayOptions as JSON, e.g. "
                                                   "'{\"model_pods_max\": 8, \"sizing\": {\"gateway_replicas\": 3}}'."),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write (default stdout).")) -> None:
    """Print a KubeRay manifest (RayService + gRPC Services + volume claim) for your image and sizes."""
    from pydantic import ValidationError

    from fusionrec.deploy.generate import kuberay_manifest
    from fusionrec.deploy.rayservice import KubeRayOptions

    try:
        fields = {"image": image, "name": name, **json.loads(options)}
        opts = KubeRayOptions.for_gpu(**fields) if gpu else KubeRayOptions(**fields)
    except (ValueError, ValidationError) as err:  # a caller mistake: one message, no traceback
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    text = kuberay_manifest(opts)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        typer.echo(f"wrote {output}")


@deploy_app.command("probe")
def probe(target: str = typer.Option("127.0.0.1:9000", "--target", "-t", help="host:port of the gRPC service."),
          service: str = typer.Option("fusionrec.v1.Recommender", help="grpc.health.v1 service name ('' = server)."),
          timeout_s: float = typer.Option(3.0, help="Seconds to wait for the answer.")) -> None:
    """grpc.health.v1 Check: exit 0 when SERVING, 1 otherwise (the images' HEALTHCHECK). Light: no Ray."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as err:
            status = f"unreachable ({err.code().name})"
    typer.echo(f"{target} {service or '(server)'}: {status}")
    raise typer.Exit(0 if status == "SERVING" else 1)
