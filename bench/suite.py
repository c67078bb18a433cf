"""`make bench`: every benchmark in one run, side by side, into bench/results/summary.json."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

from fusionrec.core.paths import shared_path
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.bench import encode, load, openloop, seed
from fusionrec.bench.floor import build_floor_app
from fusionrec.bench.latency import system_memory_mb
from fusionrec.cli.client import Client
from fusionrec.gateway.config import load_serve_file
from fusionrec.gateway.runtime import Running, start, stop
from fusionrec.cli.sample_catalog import generate_catalog

Log = Callable[[str], None]
Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> update(k)


def user_requests(users: list[str], k: int = 10) -> list[pb.RecommendRequest]:
    return [pb.RecommendRequest(user_id=u, k=k) for u in users]


def mixed_requests(users: list[str], inputs: dict[str, list]) -> list[tuple[str, list[pb.RecommendRequest], float]]:
    """By user, and by user with a text / image / audio query (the sample catalog's content)."""
    by_kind = {"text": "text", "image": "image", "audio": "audio"}
    mix = [("by_user", user_requests(users), 0.55)]
    for kind, field in by_kind.items():
        reqs = [pb.RecommendRequest(user_id=users[i % len(users)], k=10, query=pb.Content(**{field: x}))
                for i, x in enumerate(inputs[kind][:16])]
        mix.append((f"{kind}_query", reqs, 0.15))
    return mix


def _table(name: str, results: list[load.LevelResult], log: Log) -> None:
    log(f"{name}: {'conc':>5} {'qps':>8} {'p50':>8} {'p95':>8} {'p99':>8}  errors")
    for r in results:
        log(f"{'':{len(name)}}  {r.concurrency:5d} {r.qps:8.1f} {r.p50_ms:8.1f} {r.p95_ms:8.1f} {r.p99_ms:8.1f}  {r.errors or ''}")


def run_floor(config: Path, users: list[str], levels: tuple[int, ...], duration_s: float) -> list[load.LevelResult]:
    """By-user load on the floor app (the same Gateway and hops over no-op deployments), started and stopped here."""
    running = start(config, overrides={"server": {"port": 0}}, builder=build_floor_app)
    try:
        return load.closed_loop(running.target, [("by_user", user_requests(users), 1.0)], list(levels), duration_s)
    finally:
        stop()


def _cold_start(config: Path, db_path: Path, log: Log) -> tuple[Running, Client, float]:
    """Start the real app on a fresh store; the time until its first answer (Ray + models + one upsert)."""
    t0 = time.monotonic()
    running = start(config, overrides={"server": {"port": 0}, "store": {"uri": str(db_path)}})
    client = Client(running.target)
    client.stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.ItemInput(item_id="first", content=pb.Content(text="hello"))]))
    client.stub.Recommend(pb.RecommendRequest(query=pb.Content(text="hello"), k=1), timeout=30)
    cold_start_s = time.monotonic() - t0
    log(f"cold start (Ray + models + first answer): {cold_start_s:.1f} s")
    return running, client, cold_start_s


def _seed(running: Running, client: Client, n_items: int, n_users: int,
          progress: Progress | None) -> tuple[list[str], dict[str, int], float]:
    """Seed n_items synthetic items and n_users users: (user ids, modality dims, items/s)."""
    t1 = time.monotonic()
    dims = dict(retrieval_info(running.app_name)["modality_dims"])
    users = seed.seed_store(client, running.app_name, n_items, n_users,
                            progress=progress("seed items", n_items) if progress else None)
    return users, dims, n_items / (time.monotonic() - t1)


def _recommend_curves(target: str, users: list[str], inputs: dict[str, list], levels: tuple[int, ...],
                      duration_s: float, log: Log) -> tuple[list[load.LevelResult], list[load.LevelResult]]:
    """Closed-loop Recommend load: by user, then the mixed by-user / content-query traffic."""
    by_user = load.closed_loop(target, [("by_user", user_requests(users), 1.0)], list(levels), duration_s)
    _table("recommend by_user", by_user, log)
    mixed = load.closed_loop(target, mixed_requests(users, inputs), list(levels), duration_s)
    _table("recommend mixed", mixed, log)
    return by_user, mixed


def _headline(by_user: list[load.LevelResult], mixed: list[load.LevelResult], floor: list[load.LevelResult],
              efficiency: dict[str, dict]) -> dict:
    """summary.json's figures: peak and knee of Recommend, its ratio to the floor, encode efficiency, curves."""
    best, best_floor, knee = load.peak(by_user), load.peak(floor), load.knee(by_user)
    return {
        "recommend_qps": best.qps, "recommend_p99_ms": best.p99_ms, "recommend_peak_concurrency": best.concurrency,
        "recommend_knee": {"concurrency": knee.concurrency, "qps": knee.qps, "p99_ms": knee.p99_ms,
                           "definition": "lowest concurrency reaching 90% of peak throughput"},
        "floor_qps": best_floor.qps, "floor_p99_ms": best_floor.p99_ms,
        "recommend_to_floor_qps": best.qps / best_floor.qps, "recommend_to_floor_p99": best.p99_ms / best_floor.p99_ms,
        "encode_efficiency": {m: v["efficiency"] for m, v in efficiency.items()},
        "encode": efficiency,
        "curves": {"recommend_by_user": load.as_dicts(by_user), "recommend_mixed": load.as_dicts(mixed),
                   "floor_by_user": load.as_dicts(floor)},
    }


def _plots(by_user: list[load.LevelResult], mixed: list[load.LevelResult], floor: list[load.LevelResult],
           efficiency: dict[str, dict], out_dir: Path, n_items: int) -> None:
    load.plot_curves({"recommend by user": by_user, "recommend mixed": mixed, "floor (no-op deployments)": floor},
                     out_dir / "recommend.png", f"Recommend over {n_items:,} items vs the Serve floor")
    encode.plot(efficiency, out_dir / "encode.png")


def _retrieval(sizes: tuple[int, ...], out_dir: Path) -> dict:
    """Retrieval in isolation, both backends: the full result under "retrieval", plus its headline figures."""
    from fusionrec.bench import retrieval

    rr = retrieval.run(sizes=sizes, out_dir=out_dir)
    return {"retrieval": rr, **retrieval.headline(rr)}


def run_suite(config: Path, out_dir: Path, n_items: int = 100_000, n_users: int = 1000,
              levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32), duration_s: float = 8.0,
              encode_items: dict[str, int] | None = None, retrieval_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000),
              log: Log = print, progress: Progress | None = None, autoscale: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    # ~5-8 s per timed pass: shorter ones (audio at 192 items: ~1.5 s) moved the ratio by +-0.3 run to run
    encode_items = encode_items or {"text": 1024, "image": 128, "audio": 576}
    app_cfg = load_serve_file(config).app_config()
    summary: dict = {"date": time.strftime("%Y-%m-%d"), "config": str(config), "n_items": n_items}
    with tempfile.TemporaryDirectory(prefix="fusionrec-bench-") as tmp:
        work = Path(tmp)
        catalog = generate_catalog(work / "catalog", shared_path("media"),
                                   n_items=64, n_users=4)
        inputs = encode.sample_inputs(catalog.catalog_path)

        # 1. The floor first, on a quiet machine (its best case: the ratio to it is conservative):
        # the same Gateway, hops and load over no-op deployments.
        floor = run_floor(config, seed.user_ids(n_users), levels, duration_s)
        _table("floor by_user", floor, log)

        # 2. The real app: cold start, 100k synthetic items, load, serving efficiency, memory.
        running, client, summary["cold_start_s"] = _cold_start(config, work / "bench.db", log)
        try:
            users, dims, summary["seed_items_per_s"] = _seed(running, client, n_items, n_users, progress)
            by_user, mixed = _recommend_curves(running.target, users, inputs, levels, duration_s, log)
            # Open loop, Recommend by user and the floor deployed beside it, interleaved by rate.
            summary.update(openloop.measure_with_floor(config, running.app_name, running.target, users, out_dir,
                                                       n_items=n_items, log=log))
            summary["memory"] = system_memory_mb()
            efficiency = encode.efficiency(running.target, app_cfg, inputs, encode_items, dims,
                                           running.info["encoder_versions"], log)
            if autoscale:  # ~3 min: a load ramp on the same app, replicas min -> max -> min (bench/autoscale.py)
                summary["autoscale"] = _autoscale(config, running, inputs, out_dir, log)
        finally:
            stop()

    summary.update(_headline(by_user, mixed, floor, efficiency))
    _plots(by_user, mixed, floor, efficiency, out_dir, n_items)

    # 3. Retrieval in isolation, both backends.
    if retrieval_sizes:
        summary.update(_retrieval(retrieval_sizes, out_dir))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_openloop(config: Path, out_dir: Path, n_items: int = 100_000, n_users: int = 1000,
                 rates: tuple[float, ...] = openloop.DEFAULT_RATES_QPS, duration_s: float = 10.0,
                 bound_ms: float = openloop.DEFAULT_BOUND_MS, log: Log = print,
                 progress: Progress | None = None) -> dict:
    """`fusionrec bench openloop` alone: the real app on a fresh store with n_items synthetic items, the
    floor beside it; the SLO figures also go into an existing summary.json."""
    with tempfile.TemporaryDirectory(prefix="fusionrec-bench-") as tmp:
        running, client, _ = _cold_start(config, Path(tmp) / "bench.db", log)
        try:
            users, _, per_s = _seed(running, client, n_items, n_users, progress)
            log(f"seeded {n_items:,} items through the store path: {per_s:.0f} items/s")
            headline = openloop.measure_with_floor(config, running.app_name, running.target, users, out_dir,
                                                   rates=rates, duration_s=duration_s, bound_ms=bound_ms,
                                                   n_items=n_items, log=log)
        finally:
            stop()
    path = out_dir / "summary.json"
    if path.exists():
        path.write_text(json.dumps(json.loads(path.read_text()) | headline, indent=2))
    return headline


def _autoscale(config: Path, running: Running, inputs: dict[str, list], out_dir: Path, log: Log) -> dict:
    """bench/results/autoscale.{json,png} on the running app; summary.json gets its headline."""
    from fusionrec.bench import autoscale
    from fusionrec.gateway.runtime import render_config

    bounds = autoscale.replica_bounds(render_config(config))
    result = autoscale.measure(running.target, running.app_name, bounds, inputs, autoscale.AutoscalePlan(), log)
    autoscale.write(result | {"config": str(config)}, out_dir)
    return autoscale.headline(result)


def retrieval_info(app_name: str) -> dict:
    """The running app's store schema (modality dims, encoder versions, model version)."""
    from ray import serve

    from fusionrec.gateway.runtime import call_handle

    return call_handle(serve.get_deployment_handle("Retrieval", app_name), "info")
