"""Health that stays true: NOT_SERVING while a deployment the Gateway calls has no live replica.

A `HealthWatcher` probes every `interval_s` and publishes a change only (SERVING <-> NOT_SERVING).
Before start-up completes it publishes nothing (health stays NOT_SERVING, see gateway/server.py). A
probe that fails or times out (e.g. the Serve controller restarting) changes nothing: the replicas
may serve meanwhile, and the next probe decides. The probe and publisher are plain callables, so the
state machine is tested without Ray; `deployment_probe` is the real one, Serve's public
`serve.status()` (a blocking controller call, so it runs in a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable, Iterable

from fusionrec.gateway.server import set_serving

log = logging.getLogger("ray.serve")  # lands in the replica log files

#: Returns the names of required deployments that have no live replica (empty: all well).
Probe = Callable[[], Awaitable[list[str]]]
Publish = Callable[[bool], Awaitable[None]]

DEFAULT_INTERVAL_S = 2.0
DEFAULT_PROBE_TIMEOUT_S = 2.0


class HealthWatcher:
    def __init__(self, probe: Probe, publish: Publish, started: Callable[[], bool],
                 interval_s: float = DEFAULT_INTERVAL_S, probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S) -> None:
        self._probe = probe
        self._publish = publish
        self._started = started
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.serving: bool | None = None  # what this watcher last published; None: nothing yet
        self.down: list[str] = []
        self._failing = False
        self._task: asyncio.Task | None = None

    async def step(self) -> bool | None:
        """One probe; publishes when the verdict differs from the last one. Returns the verdict
        (None: not started yet, or the probe failed)."""
        if not self._started():
            return None
        try:
            down = sorted(await asyncio.wait_for(self._probe(), self.probe_timeout_s))
        except Exception as exc:  # noqa: BLE001 - a failed probe is no verdict
            if not self._failing:  # once per run of failures, not every interval
                log.warning("health probe failed (%s: %s); keeping %s", type(exc).__name__, exc, self._name())
            self._failing = True
            return None
        self._failing = False
        serving = not down
        if serving != self.serving or down != self.down:
            if not serving:
                log.warning("health NOT_SERVING: no live replica of %s", ", ".join(down))
            elif self.serving is False:
                log.info("health SERVING again: every required deployment has a live replica")
            await self._publish(serving)
        self.serving, self.down = serving, down
        return serving

    def is_down(self, deployment_name: str) -> bool:
        """Whether the last verdict named this deployment as having no live replica."""
        return deployment_name in self.down

    def _name(self) -> str:
        return {None: "the current status", True: "SERVING", False: "NOT_SERVING"}[self.serving]

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:  # noqa: BLE001 - publishing failed; keep watching
                log.exception("health watcher step failed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


#: Replica states of a live replica: serving, or being reconfigured in place (a new user_config, e.g. a
#: fusion model hot swap: requests wait for it rather than fail), or recovered by a restarted
#: controller, or on a draining node. STARTING, STOPPING and STOPPED are not.
LIVE_STATES = ("RUNNING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")


def live_replicas(status: Any, app_name: str, deployment_name: str) -> int:
    """Live replicas of one deployment in a `serve.status()` result (0 when it is not listed)."""
    app = status.applications.get(app_name)
    deployment = app.deployments.get(deployment_name) if app is not None else None
    if deployment is None:
        return 0
    return sum(n for state, n in deployment.replica_states.items() if str(getattr(state, "value", state)) in LIVE_STATES)


def deployment_probe(targets: Iterable[tuple[str, str]], read_status: Callable[[], Any] | None = None) -> Probe:
    """A probe over (app name, deployment name) pairs through Serve's public `serve.status()`: names those
    without a live replica. A killed replica is seen at the controller's next health check of it
    (`health_check_period_s`, 10 s by default). ``read_status``: what to call instead of serve.status."""
    targets = sorted(set(targets))
    pending: asyncio.Future | None = None

    async def probe() -> list[str]:
        # One controller call at a time: a hung one (timed out by the watcher) is awaited again, not repeated.
        nonlocal pending
        from ray import serve

        if pending is None or pending.done():
            pending = asyncio.ensure_future(asyncio.to_thread(read_status or serve.status))
        status = await asyncio.shield(pending)
        return [name for app, name in targets if live_replicas(status, app, name) < 1]

    return probe


def watch_deployments(handles: Iterable[Any], health_servicer: Any, interval_s: float = DEFAULT_INTERVAL_S
                      ) -> HealthWatcher:
    """A watcher over the deployments behind these DeploymentHandles, publishing to the front door's
    health (gateway/server.py's FrontDoorHealth); call `.start()` on the replica's event loop."""
    probe = deployment_probe((h.app_name, h.deployment_name) for h in handles)
    return HealthWatcher(probe, lambda serving: set_serving(health_servicer, serving),
                         lambda: bool(getattr(health_servicer, "started", False)), interval_s)
