"""Health follows the deployments for real (gateway/health.py over serve.status() in the Gateway replica):
NOT_SERVING while the Fusion deployment has no live replica, SERVING again once Serve replaced it."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_health_goes_not_serving_while_a_deployment_is_down_and_back_after(service, client, loaded):
    import ray

    from fusionrec.gateway.runtime import connect

    connect("auto")
    assert client.serving()
    prefix = f"SERVE_REPLICA::{service.app_name}#Fusion#"
    (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    # Serve notices within its health-check period (10 s by default), the watcher within 2 s more.
    assert _wait(lambda: not client.serving(timeout_s=1), 60), "health stayed SERVING with Fusion down"
    assert _wait(lambda: client.serving(timeout_s=1), 180), "health did not come back once Fusion was replaced"
