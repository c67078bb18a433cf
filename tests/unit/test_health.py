"""The health watcher's state machine with fake probes (no Ray): NOT_SERVING while a required deployment
has no live replica, SERVING again after, nothing before start-up, no verdict from a failed probe."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
from ray.serve._private.common import ReplicaState

from fusionrec.gateway.health import HealthWatcher, deployment_probe, live_replicas


class _Fakes:
    """A scripted probe (each step takes the next answer; an exception is raised) and a publish log."""

    def __init__(self, answers) -> None:
        self.answers = list(answers)
        self.published: list[bool] = []
        self.started = True

    async def probe(self) -> list[str]:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        if answer == "hang":
            await asyncio.sleep(60)
        return answer

    async def publish(self, serving: bool) -> None:
        self.published.append(serving)

    def watcher(self) -> HealthWatcher:
        return HealthWatcher(self.probe, self.publish, lambda: self.started, interval_s=0.01, probe_timeout_s=0.05)


def _steps(fakes: _Fakes, n: int) -> list:
    async def run():
        watcher = fakes.watcher()
        return [await watcher.step() for _ in range(n)]

    return asyncio.run(run())


def test_goes_not_serving_while_a_deployment_is_down_and_back_after():
    fakes = _Fakes([[], [], ["Retrieval"], ["Retrieval"], ["Retrieval", "TextEncoder"], [], []])
    verdicts = _steps(fakes, 7)
    assert verdicts == [True, True, False, False, False, True, True]
    # Published on changes only (the set of down deployments changing republishes NOT_SERVING).
    assert fakes.published == [True, False, False, True]


def test_publishes_nothing_and_probes_nothing_before_start_up():
    fakes = _Fakes([[], ["Fusion"]])
    fakes.started = False

    async def run():
        watcher = fakes.watcher()
        before = [await watcher.step() for _ in range(3)]
        fakes.started = True
        return before, await watcher.step(), await watcher.step()

    before, first, second = asyncio.run(run())
    assert before == [None, None, None] and fakes.answers == []  # both answers used only after start-up
    assert (first, second) == (True, False)
    assert fakes.published == [True, False]


def test_a_failed_or_hung_probe_changes_nothing():
    fakes = _Fakes([[], RuntimeError("controller restarting"), "hang", ["Fusion"], ConnectionError(), []])
    assert _steps(fakes, 6) == [True, None, None, False, None, True]
    assert fakes.published == [True, False, True]


def test_run_loop_starts_and_stops():
    fakes = _Fakes([[]] * 3 + [["Retrieval"]] * 1000)

    async def run():
        watcher = fakes.watcher()
        watcher.start()
        for _ in range(200):
            if fakes.published == [True, False]:
                break
            await asyncio.sleep(0.01)
        await watcher.stop()
        return watcher.serving

    assert asyncio.run(run()) is False
    assert fakes.published == [True, False]


def _status(**apps) -> SimpleNamespace:
    """A stand-in for serve.status(): {app: {deployment: replica_states}}."""
    return SimpleNamespace(applications={
        app: SimpleNamespace(deployments={name: SimpleNamespace(replica_states=states) for name, states in deps.items()})
        for app, deps in apps.items()})


def test_live_replicas_reads_serve_status():
    status = _status(default={"Retrieval": {"RUNNING": 2, "STARTING": 1}, "Fusion": {"STARTING": 1},
                              "ImageEncoder": {ReplicaState.UPDATING: 1, ReplicaState.STOPPING: 1}})
    assert live_replicas(status, "default", "Retrieval") == 2
    assert live_replicas(status, "default", "ImageEncoder") == 1  # reconfigured in place: still live
    assert live_replicas(status, "default", "Fusion") == 0
    assert live_replicas(status, "default", "TextEncoder") == 0  # not listed: none live
    assert live_replicas(status, "other", "Retrieval") == 0


def test_deployment_probe_makes_one_controller_call_at_a_time():
    calls, gate = [], threading.Event()

    def slow_status():
        calls.append(1)
        gate.wait(10)
        return _status(default={"Retrieval": {"RUNNING": 1}})

    probe = deployment_probe([("default", "Retrieval")], read_status=slow_status)

    async def run():
        for _ in range(3):  # the watcher times each probe out; the hung call is not repeated
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(probe(), 0.05)
        gate.set()
        return await probe()

    assert asyncio.run(run()) == [] and len(calls) == 1
