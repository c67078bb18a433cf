"""The ranking stage's serving cost at the service level: Recommend over real gRPC, ranking off vs on.

The real app (deploy/local.yaml: the Gateway's grpc.aio front door, the encoder, Fusion and Retrieval
deployments, the in-memory index over a Milvus Lite file) on a fresh store seeded with n synthetic
items and users (bench/seed.py seed_store). One app cannot serve both ways at once, so phases alternate:
ranking off (as started), on (the Retrieval deployment's user_config names the ranker: applied to the
running replica in about a second), off, on, ... Each phase waits until answers show its mode (with ranking off an item's
score is the sum of its per-modality contributions, with the ranker it is not), warms up, then sends
sequential by-user Recommend calls from one client. Latency is the client's: gRPC, the Gateway, the
Retrieval hop, the engine and the ranking stage.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fusionrec.v1 import recommender_pb2 as pb

Log = Callable[[str], None]
MODES = ("retrieval", "ranking")
#: Users whose answers tell a phase's mode.
PROBE_USERS = 5


def latency_stats(samples_ms: list[float]) -> dict[str, float]:
    """p50, p99 and mean of latencies in ms."""
    return {"p50_ms": float(np.percentile(samples_ms, 50)), "p99_ms": float(np.percentile(samples_ms, 99)),
            "mean_ms": float(np.mean(samples_ms))}


def ratios(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    """With ranking over retrieval-only, for p50 and p99."""
    return {f"{q}_ratio": stats["ranking"][f"{q}_ms"] / stats["retrieval"][f"{q}_ms"] for q in ("p50", "p99")}


def _ranked_by_ranker(reply: pb.RecommendResponse) -> bool | None:
    """Whether a reply's scores come from a ranker (they are not the sum of their contributions); None if empty."""
    if not reply.items:
        return None
    return any(abs(it.score - sum(c.score for c in it.contributions)) > 1e-3 * max(1.0, abs(it.score))
               for it in reply.items)


def _wait_for_mode(client: Any, users: list[str], mode: str, timeout_s: float = 900) -> float:
    """Poll until every probe user's answer is in ``mode`` (a restarting Retrieval fails calls meanwhile);
    returns the seconds waited."""
    import grpc

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            got = {_ranked_by_ranker(client.stub.Recommend(pb.RecommendRequest(user_id=u, k=10), timeout=30))
                   for u in users}
            if got == {mode == "ranking"}:
                return time.monotonic() - t0
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Recommend did not answer with ranking {'on' if mode == 'ranking' else 'off'} "
                       f"within {timeout_s:.0f} s of the redeploy")


def _wait_settled(app_name: str, timeout_s: float = 600) -> None:
    """Wait until the app is RUNNING with every deployment HEALTHY (a rollout's old replicas gone)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        states = {str(d.status).rsplit(".", 1)[-1] for d in app.deployments.values()} if app else set()
        if app and str(app.status).rsplit(".", 1)[-1] == "RUNNING" and states == {"HEALTHY"}:
            return
        time.sleep(0.5)
    raise TimeoutError(f"application {app_name} did not settle within {timeout_s:.0f} s")


def _sequential(client: Any, users: list[str], n: int, warmup: int, rng: np.random.Generator) -> list[float]:
    """``n`` by-user Recommend calls one after another (after ``warmup`` unmeasured ones), in ms."""
    picks = rng.choice(users, n + warmup)
    samples = []
    for r, user in enumerate(picks):
        t0 = time.perf_counter()
        client.stub.Recommend(pb.RecommendRequest(user_id=str(user), k=10), timeout=30)
        if r >= warmup:
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _hop_ms(client: Any, users: list[str], n: int, rng: np.random.Generator) -> dict[str, float]:
    """Where a call's time goes: the Gateway's retrieve_and_rank stage (the Retrieval hop: Ray handle call,
    engine, ranking) and the rest (gRPC, the Gateway), medians over ``n`` calls with debug_timings."""
    hop, rest = [], []
    for user in rng.choice(users, n):
        t0 = time.perf_counter()
        reply = client.stub.Recommend(pb.RecommendRequest(user_id=str(user), k=10, debug_timings=True), timeout=30)
        total = (time.perf_counter() - t0) * 1e3
        stage = next((t.duration_ms for t in reply.timings if t.stage == "retrieve_and_rank"), float("nan"))
        hop.append(stage)
        rest.append(total - stage)
    return {"retrieve_and_rank_p50_ms": float(np.median(hop)), "retrieve_and_rank_p99_ms": float(
        np.percentile(hop, 99)), "rest_p50_ms": float(np.median(rest))}


def _start(config: Path, overrides: dict[str, Any], log: Log) -> Any:
    """The app, started; a second try when Ray itself fails to start (it timed out once on a loaded machine)."""
    from fusionrec.gateway.runtime import start, stop

    try:
        return start(config, overrides=overrides)
    except Exception as err:  # noqa: BLE001 - Ray raises plain Exception for a node start timeout
        log(f"service: the app did not start ({type(err).__name__}: {err}); trying once more")
        stop()
        return start(config, overrides=overrides)


def run_service(ranker_path: Path, n_items: int, n_users: int, requests: int, candidates_n: int, pairs: int = 6,
                warmup: int = 50, config: Path | None = None, log: Log = print) -> dict[str, Any]:
    """Start the app, seed it, measure ``pairs`` x (ranking off, ranking on), which mode goes first alternating
    from pair to pair (drift on a shared machine hits both alike); stops the app (and Ray) at the end."""
    from fusionrec.bench.reliability.service import free_port
    from fusionrec.bench.seed import seed_store
    from fusionrec.client import Client
    from fusionrec.core.paths import default_config
    from fusionrec.gateway.runtime import redeploy, stop

    config = Path(config or default_config())
    rng = np.random.default_rng(3)
    with tempfile.TemporaryDirectory(prefix="fusionrec-bench-ranking-service-") as tmp:
        plain = {"server": {"port": free_port(), "metrics_port": 0}, "store": {"uri": str(Path(tmp) / "bench.db")}}
        # The ranking stage is the Retrieval deployment's user_config: switched in place, no replica restarts.
        ranked = {**plain, "ranking": {"ranker_path": str(ranker_path), "candidates_n": candidates_n}}
        try:
            running = _start(config, plain, log)
            client = Client(running.target)
            t0 = time.monotonic()
            users = seed_store(client, running.app_name, n_items, n_users)
            log(f"service: seeded {n_items} items, {len(users)} users in {time.monotonic() - t0:.0f} s")
            phases: list[dict[str, Any]] = []
            for pair in range(pairs):
                for mode in MODES if pair % 2 == 0 else MODES[::-1]:
                    t1 = time.monotonic()
                    if phases:  # the app starts with ranking off
                        redeploy(config, overrides=ranked if mode == "ranking" else {**plain, "ranking": {}})
                    waited = _wait_for_mode(client, users[:PROBE_USERS], mode)
                    _wait_settled(running.app_name)
                    samples = _sequential(client, users, requests, warmup, rng)
                    switch_s = time.monotonic() - t1 - sum(samples) / 1e3
                    phases.append({"pair": pair, "mode": mode, "switch_s": round(switch_s, 1),
                                   "mode_wait_s": round(waited, 1), **latency_stats(samples), "samples_ms": samples,
                                   "breakdown": _hop_ms(client, users, 200, rng)})
                    log(f"service pair {pair} {mode}: p50 {phases[-1]['p50_ms']:.2f} ms, "
                        f"p99 {phases[-1]['p99_ms']:.2f} ms")
        finally:
            stop()
    return summarise(phases, n_items, len(users), requests, candidates_n)


def summarise(phases: list[dict[str, Any]], n_items: int, n_users: int, requests: int,
              candidates_n: int) -> dict[str, Any]:
    """Pooled per-mode figures, ratios pooled and per pair, the phases (without their samples)."""
    pooled = {m: latency_stats([s for p in phases if p["mode"] == m for s in p["samples_ms"]]) for m in MODES}
    per_pair = []
    for pair in sorted({p["pair"] for p in phases}):
        by_mode = {p["mode"]: p for p in phases if p["pair"] == pair}
        per_pair.append({"pair": pair, **ratios(by_mode)})
    return {"level": "service (Recommend over gRPC from one sequential client: the Gateway, the Retrieval "
                     "deployment, the engine with the in-memory index, the ranking stage)",
            "items": n_items, "users": n_users, "requests_per_phase": requests, "candidates_n": candidates_n,
            **pooled, **ratios(pooled), "pairs": per_pair,
            "phases": [{k: v for k, v in p.items() if k != "samples_ms"} for p in phases]}
