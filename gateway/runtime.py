"""Start and stop Ray + the Serve application from a Serve config file (used by the CLI and tests)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "deploy" / "local.yaml"

# Settings replicas must see; Ray workers inherit the environment of the process that starts Ray.
RUNTIME_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}


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


def start(config_path: str | Path = DEFAULT_CONFIG, ray_address: str | None = None,
          overrides: dict[str, Any] | None = None, num_cpus: int | None = None) -> Running:
    """Connect to (or start) Ray, deploy the app, and wait until health is SERVING.

    overrides: merged into the app's `args` (e.g. {"server": {"port": 0}, "store": {"uri": ...}}).
    """
    import ray
    from ray import serve

    from gateway.app import build_app
    from gateway.config import load_serve_file

    t0 = time.monotonic()
    for key, value in RUNTIME_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    serve_file = load_serve_file(config_path)
    args = _merge(serve_file.applications[0].get("args") or {}, overrides or {})
    if not ray.is_initialized():
        ray.init(address=ray_address, num_cpus=None if ray_address else num_cpus,
                 include_dashboard=False, log_to_driver=False, namespace="fusionrec")
    serve.start(proxy_location=serve_file.proxy_location, http_options=serve_file.http_options or None,
                logging_config=serve_file.logging_config or None)
    handle = serve.run(build_app(args), name=serve_file.app_name, route_prefix=None,
                       logging_config=serve_file.logging_config or None)
    info = handle.ready.remote().result(timeout_s=600)
    return Running(app_name=serve_file.app_name, host=info["host"], port=info["port"],
                   startup_s=time.monotonic() - t0, info=info)


def stop(app_name: str | None = None) -> None:
    """Shut Serve and Ray down (only what this process started or joined)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out
