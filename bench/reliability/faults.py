"""Faults under concurrent write + read load: kill -9 one replica of each deployment in turn, then the
whole process tree followed by a restart; every acknowledged write must still be readable.

recovery_s per deployment: from the kill until a replacement replica process runs (as many as before)
and a probe call through that deployment succeeds; for the whole tree, until the restarted service is
SERVING and the probe succeeds.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.bench.reliability import media, processes
from fusionrec.bench.reliability.traffic import Traffic, TrafficPlan, missing
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc

Log = Callable[[str], None]
WHOLE_TREE = "whole tree (restart)"


def _query_probe(modality: str) -> Callable[[pb_grpc.RecommenderStub, tuple], bool]:
    content = {"text": lambda: pb.Content(text="a calm cat"), "image": lambda: pb.Content(image=media.picture()),
               "audio": lambda: pb.Content(audio=media.tone())}[modality]

    def probe(stub: pb_grpc.RecommenderStub, metadata: tuple) -> bool:
        reply = stub.Recommend(pb.RecommendRequest(query=content(), k=3), timeout=10, metadata=metadata)
        return modality in reply.modalities_used and not reply.degraded

    return probe


def _health_probe(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _write_probe(stub: pb_grpc.RecommenderStub, metadata: tuple) -> bool:
    item = pb.ItemInput(item_id="rel-probe", content=pb.Content(text="probe item"))
    return stub.UpsertItems(pb.UpsertItemsRequest(items=[item]), timeout=10, metadata=metadata).upserted == 1


def _read_probe(stub: pb_grpc.RecommenderStub, metadata: tuple) -> bool:
    stub.Recommend(pb.RecommendRequest(user_id="rel-user-0", k=3), timeout=10, metadata=metadata)
    return bool(stub.GetItem(pb.GetItemRequest(item_id="rel-probe"), timeout=10, metadata=metadata).item_id)


#: The call that must succeed through each deployment once it recovered.
PROBES = {"Gateway": _read_probe, "TextEncoder": _query_probe("text"), "ImageEncoder": _query_probe("image"),
          "AudioEncoder": _query_probe("audio"), "Fusion": _write_probe, "Retrieval": _read_probe}


def wait_probe(target: str, token: str, probe, timeout_s: float) -> bool:
    """Until health is SERVING and ``probe`` succeeds (True), or the timeout (False)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        while time.monotonic() < deadline:
            try:
                if _health_probe(channel) and probe(stub, metadata):
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


def kill_replica(target: str, token: str, root_pid: int, deployment: str, timeout_s: float = 300,
                 app_name: str = "fusionrec") -> float | None:
    """kill -9 the oldest replica of ``deployment``; seconds until it is replaced and its probe succeeds
    (None: not within ``timeout_s``, or no such replica)."""
    procs = processes.replicas(root_pid, app_name).get(deployment, [])
    if not procs:
        return None
    victim = procs[0]
    t0 = time.monotonic()
    processes.kill9(victim)
    if not processes.wait_replaced(root_pid, deployment, victim.pid, len(procs), timeout_s, app_name):
        return None
    left = timeout_s - (time.monotonic() - t0)
    return time.monotonic() - t0 if wait_probe(target, token, PROBES[deployment], left) else None


def run_faults(service: Any, versions: dict[str, str], dim: int, deployments: tuple[str, ...] = processes.DEPLOYMENTS,
               whole_tree: bool = True, settle_s: float = 5.0, plan: TrafficPlan | None = None,
               log: Log = print) -> dict[str, Any]:
    """The report's `faults` section. ``service``: has target, token, pid and, for ``whole_tree``,
    kill_tree() and start() (bench/reliability/service.py ServiceProcess)."""
    users = [f"rel-user-{i}" for i in range(8)]
    traffic = Traffic(service.target, service.token, versions, dim, plan or TrafficPlan(), users).start()
    recovery: dict[str, float | None] = {}
    failed: dict[str, int] = {}  # calls that failed from each kill until recovery (+ settle): the outage felt
    try:
        if not wait_probe(service.target, service.token, _write_probe, 120):  # the item _read_probe reads
            raise RuntimeError("the service did not take a write before the faults")
        time.sleep(settle_s)  # some writes acknowledged before the first kill
        for name in deployments:
            before = traffic.counts.error_total()
            recovery[name] = kill_replica(service.target, service.token, service.pid, name)
            time.sleep(settle_s)
            failed[name] = traffic.counts.error_total() - before
            log(f"  killed a {name} replica: recovered in {_fmt(recovery[name])}, {failed[name]} calls failed")
        if whole_tree:
            t0, before = time.monotonic(), traffic.counts.error_total()
            killed = service.kill_tree()
            service.start()
            ok = wait_probe(service.target, service.token, _read_probe, 300)
            recovery[WHOLE_TREE] = time.monotonic() - t0 if ok else None
            time.sleep(settle_s)
            failed[WHOLE_TREE] = traffic.counts.error_total() - before
            log(f"  killed the whole tree ({killed} processes) and restarted: {_fmt(recovery[WHOLE_TREE])}")
    finally:
        counts = traffic.stop()
    acked = list(dict.fromkeys(traffic.acked))
    lost = missing(service.target, service.token, acked)
    return {"acknowledged": len(acked), "lost": len(lost), "lost_ids": lost[:20], "recovery_s": recovery,
            "failed_calls": failed,
            "read_missing_during_load": counts.read_missing, "calls_ok": dict(counts.ok),
            "calls_failed": dict(counts.errors)}


def _fmt(seconds: float | None) -> str:
    return "never (timed out)" if seconds is None else f"{seconds:.1f} s"
