"""Health follows the deployments for real: a real Serve deployment made unhealthy and kept from
restarting, read through the real controller (`serve.status`), published on the front door's health."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from ray import serve

from fusionrec.gateway.health import deployment_probe, live_replicas, watch_deployments
from fusionrec.gateway.server import SERVICE_NAME, FrontDoorHealth, set_serving

pytestmark = pytest.mark.integration
APP = "health-probe-test"


@serve.deployment(num_replicas=1, health_check_period_s=0.5, health_check_timeout_s=2,
                  graceful_shutdown_timeout_s=0.1, ray_actor_options={"num_cpus": 0})
class Flaky:
    """Fails its health check while `flag` exists; a replacement replica does not finish starting meanwhile."""

    def __init__(self, flag: str) -> None:
        self.flag = flag
        while os.path.exists(flag):
            time.sleep(0.1)

    def check_health(self) -> None:
        if os.path.exists(self.flag):
            raise RuntimeError("made unhealthy by the test")

    def __call__(self) -> str:
        return "ok"


async def _until(probe, wanted: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await probe() == wanted:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"probe did not report {wanted} within {timeout_s} s")


def test_health_goes_not_serving_while_a_deployment_has_no_live_replica_and_back(service, tmp_path: Path):
    flag = tmp_path / "unhealthy"
    handle = serve.run(Flaky.bind(str(flag)), name=APP, route_prefix=None)

    async def scenario() -> list:
        probe = deployment_probe([(APP, "Flaky")])
        health = FrontDoorHealth()
        watcher = watch_deployments([handle], health)

        async def status() -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), None)).status

        seen = [await watcher.step()]  # before start-up: no verdict
        await set_serving(health, True)  # start-up complete
        seen.append(await watcher.step())
        flag.touch()  # the replica fails its checks; its replacement cannot finish starting
        await _until(probe, ["Flaky"])
        seen += [await watcher.step(), await status()]
        flag.unlink()  # the replacement starts
        await _until(probe, [])
        seen += [await watcher.step(), await status()]
        return seen

    try:
        assert handle.remote().result(timeout_s=30) == "ok"
        assert live_replicas(serve.status(), APP, "Flaky") == 1
        assert asyncio.run(scenario()) == [None, True, False, health_pb2.HealthCheckResponse.NOT_SERVING,
                                           True, health_pb2.HealthCheckResponse.SERVING]
        assert handle.remote().result(timeout_s=30) == "ok"
    finally:
        flag.unlink(missing_ok=True)
        serve.delete(APP)
