"""Front-door outage when one Gateway replica is killed -9: callers on channels of their own keep calling
Recommend while one replica's process dies; the port is shared (SO_REUSEPORT) by the replicas left.

Three views of the outage, each the longest time callers of that kind went without an answer:
- `raw`: plain gRPC stubs, no retries: a channel whose connection was on the killed replica fails the
  calls in flight, then reconnects (to a survivor);
- `retrying`: fusionrec.client with its default retry policy (UNAVAILABLE retried with backoff);
- `new_connections`: a health Check on a fresh connection every `probe_every_s`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.client import Client
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc


@dataclass
class CallerLog:
    """One caller's calls: (start, end, ok) in time.monotonic() seconds."""

    kind: str
    calls: list[tuple[float, float, bool]] = field(default_factory=list)

    def outage_s(self, since: float) -> float:
        """Longest stretch after ``since`` from the start of a failed call to the end of the next success."""
        worst, failing_from = 0.0, None
        for start, end, ok in self.calls:
            if end < since:
                continue
            if not ok and failing_from is None:
                failing_from = start
            elif ok and failing_from is not None:
                worst, failing_from = max(worst, end - failing_from), None
        if failing_from is not None:  # never recovered within the run
            worst = max(worst, self.calls[-1][1] - failing_from)
        return worst


def _raw_call(target: str) -> Callable[[], None]:
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.RecommenderStub(channel)
    return lambda: stub.Recommend(pb.RecommendRequest(user_id="u1", k=5), timeout=2)


def _retrying_call(target: str) -> Callable[[], None]:
    client = Client(target=target)
    return lambda: client.recommend("u1", k=5, timeout_s=5)


def _new_connection_check(target: str) -> Callable[[], None]:
    def check() -> None:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError("not serving")
    return check


def _loop(call: Callable[[], None], log: CallerLog, stop: threading.Event, pause_s: float) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            call()
            ok = True
        except Exception:  # noqa: BLE001 - every failure is part of the outage
            ok = False
        log.calls.append((t0, time.monotonic(), ok))
        time.sleep(pause_s)


def measure_kill(target: str, gateway_pid: int, channels: int = 8, before_s: float = 3.0, after_s: float = 10.0,
                 probe_every_s: float = 0.05) -> dict[str, Any]:
    """Kill -9 ``gateway_pid`` under Recommend load on ``target``; the outage per kind of caller."""
    logs = [CallerLog("raw") for _ in range(channels)] + [CallerLog("retrying") for _ in range(channels)]
    logs.append(CallerLog("new_connections"))
    makers = {"raw": _raw_call, "retrying": _retrying_call, "new_connections": _new_connection_check}
    stop = threading.Event()
    threads = [threading.Thread(target=_loop, args=(makers[log.kind](target), log, stop,
                                                    probe_every_s if log.kind == "new_connections" else 0.02),
                                daemon=True) for log in logs]
    for t in threads:
        t.start()
    time.sleep(before_s)
    killed_at = time.monotonic()
    os.kill(gateway_pid, signal.SIGKILL)
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    out: dict[str, Any] = {}
    for kind in makers:
        mine = [log for log in logs if log.kind == kind]
        after = [c for log in mine for c in log.calls if c[1] >= killed_at]
        out[kind] = {"callers": len(mine), "outage_s": round(max(log.outage_s(killed_at) for log in mine), 3),
                     "calls_after_kill": len(after), "failed_after_kill": sum(not ok for _, _, ok in after)}
    return out


@dataclass
class KillResult:
    gateway_replicas: int
    killed_pid: int
    outage: dict[str, Any]
    replica_back_s: float | None
    note: str = ("No-op deployments behind real Gateway replicas (bench/floor.py); 2 cores shared with other "
                 "work. outage_s: longest stretch from a failed call's start to the next success's end.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
