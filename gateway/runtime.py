"""Start and stop Ray + the Serve application from a Serve config file (used by the CLI and tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from fusionrec.core.paths import default_config


# Settings replicas must see; Ray workers inherit the environment of the process that starts Ray.
RUNTIME_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    # Handles route on the caller's loop, user code shares the replica loop: by_user p50 84 -> 30 ms here.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # That mode also holds the ingress replica open 30 s on stop for load balancers in front of Serve's
    # own direct-ingress servers. Ours is the Gateway's grpc.aio server, which drains itself on stop
    # (health NOT_SERVING, then server.grace_period_s for in-flight RPCs): the 30 s only delayed every
    # stop and redeploy of the Gateway.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    # Replica-to-replica calls travel over Serve's own gRPC, 4 MiB by default: content up to the front
    # door's limits (a 9.6 MB WAV, an over-large image to refuse) must reach the encoder that judges it.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "2147483647",
}
#: For a Ray head this process starts: Ray waits 30 s for its GCS to bind a port, and on two cores busy
#: with other work that took longer (twice on 2026-11-30; the GCS had not even opened its log).
LOCAL_HEAD_ENV = {"RAY_gcs_server_port_wait_time_s": "120"}
#: Ray's own single-machine switch (its default on macOS/Windows): the node IP becomes 127.0.0.1, so
#: GCS, raylet, agents and every worker's gRPC server listen on loopback only. Set for a Ray this
#: process starts and for a driver joining one (their node IPs must agree); never for other clusters.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass
class Running:
    app_name: str
    host: str
    port: int
    startup_s: float
    info: dict[str, Any]

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


def start(config_path: str | Path | None = None, ray_address: str | None = None,
          overrides: dict[str, Any] | None = None, num_cpus: int | None = None,
          builder: Callable[[dict[str, Any], list[dict[str, Any]]], Any] | None = None) -> Running:
    """Connect to (or start) Ray, deploy the app, and wait until health is SERVING.

    overrides: see `render_config`.
    builder: deploy `builder(args, deployments)` imperatively instead (benchmarks' no-op apps; it
        applies the config's `deployments:` list itself); without it the config goes through Serve's
        declarative path, as `serve run deploy/local.yaml` would, so that a later `redeploy`
        updates only the deployments whose settings changed.
    """
    import ray
    from ray import serve

    from fusionrec.gateway.config import load_serve_file

    t0 = time.monotonic()
    config_path = config_path or default_config()
    for key, value in RUNTIME_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray_address is None:
        _use_loopback()
        for key, value in LOCAL_HEAD_ENV.items():
            os.environ.setdefault(key, value)
    serve_file = load_serve_file(config_path)
    if not ray.is_initialized():
        ray.init(address=ray_address, num_cpus=None if ray_address else num_cpus,
                 include_dashboard=False, log_to_driver=False, namespace="fusionrec")
    config = render_config(config_path, overrides)
    if builder is None:
        _deploy_config(config)
        handle = serve.get_app_handle(serve_file.app_name)
    else:
        app = config["applications"][0]
        serve.start(proxy_location=serve_file.proxy_location, http_options=serve_file.http_options or None,
                    logging_config=serve_file.logging_config or None)
        handle = serve.run(builder(app.get("args") or {}, app.get("deployments") or []), name=serve_file.app_name,
                           route_prefix=None, logging_config=serve_file.logging_config or None)
    info = ready_everywhere(handle, serve_file.app_name, timeout_s=600)
    return Running(app_name=serve_file.app_name, host=info["host"], port=info["port"],
                   startup_s=time.monotonic() - t0, info=info)


def render_config(config_path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Serve config file with overrides applied, as a dict, checked like the file itself.

    overrides: merged into the app's `args` (e.g. {"server": {"port": 0}, "store": {"uri": ...}}),
        except three keys: "deployments" (deployment name -> options, each option replacing the one in
        that deployment's `deployments:` entry), "fusion" (replaces the Fusion `user_config`,
        the fusion model) and "ranking" (the Retrieval `user_config`'s ranking stage). The last two
        apply to the running replicas without a restart.
    """
    from fusionrec.gateway.config import ServeFile

    with open(config_path) as fh:
        config = yaml.safe_load(fh)
    overrides = dict(overrides or {})
    changes = {name: dict(options) for name, options in (overrides.pop("deployments", None) or {}).items()}
    fusion = overrides.pop("fusion", None)
    if fusion is not None:
        changes.setdefault("Fusion", {})["user_config"] = fusion
    ranking = overrides.pop("ranking", None)
    if ranking is not None:
        changes.setdefault("Retrieval", {})["user_config"] = {"ranking": ranking}
    app = config["applications"][0]
    app["args"] = _merge(app.get("args") or {}, overrides)
    entries = {d["name"]: dict(d) for d in app.get("deployments") or []}
    for name, options in changes.items():
        entries[name] = entries.get(name, {"name": name}) | options
    app["deployments"] = list(entries.values())
    ServeFile.model_validate(config)
    return config


def _deploy_config(config: dict[str, Any], timeout_s: float = 900) -> None:
    """Submit a Serve config through Serve's own CLI (`serve run --non-blocking`) to the running
    cluster and wait until the application is RUNNING."""
    import ray
    from ray import serve

    app_name = config["applications"][0].get("name", "fusionrec")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(config, fh)
    try:
        address = ray.get_runtime_context().gcs_address
        serve_cli = Path(sys.executable).with_name("serve")
        done = subprocess.run([str(serve_cli), "run", "--address", address, "--non-blocking", fh.name],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"serve run failed ({done.returncode}): {done.stderr[-2000:]}")
    finally:
        os.unlink(fh.name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        state = str(getattr(status, "status", "")).rsplit(".", 1)[-1] if status else ""
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {app_name} is {state}: {status.message}")
        time.sleep(1)
    raise TimeoutError(f"application {app_name} not RUNNING after {timeout_s:.0f} s")


def redeploy(config_path: str | Path, ray_address: str = "auto", overrides: dict[str, Any] | None = None) -> str:
    """Apply an edited config to the running app. Serve restarts only deployments whose code or
    options changed; a new fusion model (the Fusion `user_config`) loads in place. Returns the app name."""
    config = render_config(config_path, overrides)
    connect(ray_address)
    _deploy_config(config)
    return config["applications"][0].get("name", "fusionrec")


def reindex(app_name: str = "fusionrec", version: str | None = None, ray_address: str = "auto") -> dict[str, Any]:
    """Rebuild the store's fused vectors with the newest (or the given) loaded fusion model."""
    from ray import serve

    connect(ray_address)
    return call_handle(serve.get_deployment_handle("Retrieval", app_name), "reindex", version, timeout_s=3600)


def connect(ray_address: str = "auto") -> None:
    """Join the running Ray cluster (where `fusionrec serve` runs), once per process."""
    import ray
    from ray._private.services import get_ray_address_from_environment

    if not ray.is_initialized():
        # Resolved the way ray.init resolves it; a cluster on loopback needs a driver on loopback.
        if get_ray_address_from_environment(ray_address, None).startswith("127.0.0.1:"):
            _use_loopback()
        ray.init(address=ray_address, log_to_driver=False, namespace="fusionrec", logging_level="ERROR")


def _use_loopback() -> None:
    from ray._private import ray_constants

    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    # Ray read the variable when it was imported (in this process, before we got here); the
    # processes it spawns read it from the environment.
    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False")


def stop(app_name: str | None = None) -> None:
    """Shut Serve and Ray down (only what this process started or joined).

    Apps are deleted first: ``serve.shutdown`` alone tears them down too, but took 11.4 s here
    against 3.9 s for delete + shutdown.
    """
    import ray
    from ray import serve

    if ray.is_initialized():
        for name in serve.status().applications:
            serve.delete(name)
        serve.shutdown()
        ray.shutdown()


def replica_ids(app_name: str) -> dict[str, set[str]]:
    """Deployment name -> the ids of its live replicas (Serve names each replica actor
    ``SERVE_REPLICA::<app>#<deployment>#<id>``), to tell a restarted deployment from one left alone."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#"
    out: dict[str, set[str]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(prefix):
            deployment, replica = actor["name"][len(prefix):].split("#")
            out.setdefault(deployment, set()).add(replica)
    return out


_LIVE = {"RUNNING", "STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION"}


def ready_everywhere(handle: Any, app_name: str, timeout_s: float = 600) -> dict[str, Any]:
    """The ingress' ready() answer once every replica of it is ready (each Gateway replica serves the shared
    port, so a caller may meet any of them); ``info["gateways"]`` lists every replica's answer (pids,
    metrics ports). Concurrent calls spread over the replicas (Serve routes by queue length)."""
    import asyncio

    from ray import serve

    async def _gather() -> dict[str, dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            deployment = serve.status().applications[app_name].deployments.get(handle.deployment_name)
            states = deployment.replica_states if deployment is not None else {}
            # Replicas still starting count too: a replacement (after a kill) must be waited for.
            wanted = max(sum(n for state, n in states.items() if str(getattr(state, "value", state)) in _LIVE), 1)
            calls = [_awaited(handle.ready.remote()) for _ in range(2 * wanted + 2)]
            for info in await asyncio.wait_for(asyncio.gather(*calls), max(deadline - time.monotonic(), 1)):
                seen[info.get("replica_id", "")] = info
            if len(seen) >= wanted or time.monotonic() > deadline:
                return seen
            await asyncio.sleep(0.2)

    infos = list(asyncio.run(_gather()).values())
    return infos[0] | {"gateways": infos}


def call_handle(handle: Any, method: str, *args: Any, timeout_s: float = 60) -> Any:
    """Call a DeploymentHandle method from synchronous code and wait for the result.

    Runs inside a fresh event loop: with RAY_SERVE_THROUGHPUT_OPTIMIZED handles route on the
    caller's loop and refuse `.result()` outside one.
    """
    import asyncio

    async def _call() -> Any:
        return await asyncio.wait_for(_awaited(getattr(handle, method).remote(*args)), timeout_s)

    return asyncio.run(_call())


async def _awaited(response: Any) -> Any:
    return await response


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out
