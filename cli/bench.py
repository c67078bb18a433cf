"""`fusionrec bench ...`: benchmark commands; each prints a table and writes bench/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from tqdm import tqdm

from fusionrec.bench.reliability.processes import DEPLOYMENTS
from fusionrec.cli.client import Client
from fusionrec.core.paths import default_config, demo_dir, results_dir

TARGET = typer.Option("127.0.0.1:9000", "--target", "-t", help="host:port of the fusionrec gRPC service.")
TOKEN = typer.Option("", "--token", envvar="FUSIONREC_TOKEN", help="Auth token, if the server requires one.")
CONFIG = typer.Option(None, "--config", "-c", envvar="FUSIONREC_CONFIG", callback=lambda v: v or default_config(),
                      help="Serve config file (default: the packaged deploy/local.yaml).")
RESULTS = typer.Option(None, envvar="FUSIONREC_RESULTS_DIR", callback=lambda v: v or results_dir(),
                       help="Where JSON and PNG results go (default bench/results).")

bench_app = typer.Typer(help="Benchmarks against a running service; print a table, write bench/results/.")


@bench_app.command("latency")
def bench_latency(n: int = typer.Option(100, help="Sequential calls per request kind."), user: str = "user-001",
                  target: str = TARGET, token: str = TOKEN,
                  out_dir: Path = RESULTS) -> None:
    """Sequential Recommend p50/p99 by user and with text/image/audio queries, and system memory."""
    from fusionrec.bench import latency as bench

    client = Client(target, token)
    requests = bench.request_kinds(demo_dir(), user)
    with tqdm(total=n * len(requests), desc="recommend", unit="call") as bar:
        stats = bench.sequential_latency(client, requests, n, progress=bar.update)
    memory = bench.system_memory_mb()
    path = bench.write_results(stats, memory, out_dir, {"target": target, "calls_per_kind": n})
    typer.echo(f"{'kind':<12} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for s in stats:
        typer.echo(f"{s.kind:<12} {s.p50_ms:8.1f} {s.p99_ms:8.1f} {s.mean_ms:8.1f}")
    typer.echo(f"memory: {memory['processes']} processes, PSS {memory['pss_mb']:.0f} MiB (RSS sum {memory['rss_mb']:.0f} MiB)")
    typer.echo(f"wrote {path} and {path.with_suffix('.png')}")


def _levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _bar(desc: str, total: int):
    return tqdm(total=total, desc=desc, unit="item").update


@bench_app.command("all")
def bench_all(config: Path = CONFIG, items: int = typer.Option(100_000, help="Synthetic catalog size."),
              users: int = 1000, levels: str = "1,2,4,8,16,32", duration_s: float = 8.0,
              retrieval_sizes: str = typer.Option("10000,100000,1000000", help="Empty to skip."),
              autoscale: bool = typer.Option(True, help="Also the autoscaling ramp (~3 min, autoscale.{json,png})."),
              out_dir: Path = RESULTS) -> None:
    """Everything, side by side in one run (what `make bench` runs): bench/results/summary.json."""
    from fusionrec.bench.suite import run_suite

    summary = run_suite(config, out_dir, n_items=items, n_users=users, levels=tuple(_levels(levels)),
                        duration_s=duration_s, retrieval_sizes=tuple(_levels(retrieval_sizes)),
                        log=typer.echo, progress=_bar, autoscale=autoscale)
    keys = ("cold_start_s", "recommend_qps", "recommend_p99_ms", "recommend_knee", "floor_qps",
            "recommend_to_floor_qps", "recommend_slo_qps", "floor_slo_qps", "recommend_to_floor_slo_qps",
            "encode_efficiency", "retrieval_recall_at_100", "retrieval_p99_ms")
    for key in keys:
        typer.echo(f"{key:<26} {summary.get(key)}")
    typer.echo(f"wrote {out_dir / 'summary.json'}")


@bench_app.command("openloop")
def bench_openloop(config: Path = CONFIG, items: int = typer.Option(100_000, help="Synthetic catalog size."),
                   users: int = 1000, rates: str = typer.Option("25,50,75,100,130,160,200,250,300,400",
                                                                help="Offered rates (requests/s), ascending."),
                   duration_s: float = 10.0, bound_ms: float = typer.Option(50.0, help="The p99 bound."),
                   out_dir: Path = RESULTS) -> None:
    """Open loop (Poisson arrivals): the highest rate within the p99 bound, Recommend by user vs the floor."""
    from fusionrec.bench.suite import run_openloop

    r = run_openloop(config, out_dir, n_items=items, n_users=users,
                     rates=tuple(float(x) for x in rates.split(",") if x.strip()), duration_s=duration_s,
                     bound_ms=bound_ms, log=typer.echo, progress=_bar)
    for key, value in r.items():
        typer.echo(f"{key:<28} {value}")
    typer.echo(f"wrote {out_dir / 'openloop.json'} and {out_dir / 'openloop.png'}")


@bench_app.command("recommend")
def bench_recommend(levels: str = "1,2,4,8,16,32", duration_s: float = 8.0, users: int = 40,
                    target: str = TARGET, out_dir: Path = RESULTS) -> None:
    """Closed-loop load on the running demo service: by user and with text/image/audio queries."""
    from fusionrec.bench import encode, load
    from fusionrec.bench.suite import _table, mixed_requests

    user_ids = [f"user-{u:03d}" for u in range(1, users + 1)]
    mix = mixed_requests(user_ids, encode.sample_inputs(demo_dir() / "catalog.jsonl"))
    results = load.closed_loop(target, mix, _levels(levels), duration_s, progress=lambda r: typer.echo(
        f"  concurrency {r.concurrency}: {r.qps:.1f} req/s, p99 {r.p99_ms:.1f} ms"))
    _table("recommend mixed", results, typer.echo)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recommend.json").write_text(json.dumps(load.as_dicts(results), indent=2))
    load.plot_curves({"recommend mixed": results}, out_dir / "recommend_demo.png", "Recommend on the demo catalog")


@bench_app.command("floor")
def bench_floor(config: Path = CONFIG, levels: str = "1,2,4,8,16,32", duration_s: float = 8.0, users: int = 1000,
                out_dir: Path = RESULTS) -> None:
    """The framework's floor: the same Gateway, hops and load over no-op deployments (starts its own app)."""
    from fusionrec.bench import load, seed
    from fusionrec.bench.suite import _table, run_floor

    results = run_floor(config, seed.user_ids(users), tuple(_levels(levels)), duration_s)
    _table("floor by_user", results, typer.echo)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "floor.json").write_text(json.dumps(load.as_dicts(results), indent=2))
    load.plot_curves({"floor (no-op deployments)": results}, out_dir / "floor.png", "The Serve floor")


@bench_app.command("encode")
def bench_encode(config: Path = CONFIG, target: str = TARGET, text: int = 1024, image: int = 128, audio: int = 576,
                 out_dir: Path = RESULTS) -> None:
    """Serving efficiency on the running service: UpsertItems items/s vs the raw encoder in-process.

    Writes items under ids `enc-*`, `byo-*` and `warm*` into the running service's store.
    """
    from fusionrec.bench import encode
    from fusionrec.bench.suite import retrieval_info
    from fusionrec.gateway.config import load_serve_file
    from fusionrec.gateway.runtime import connect

    serve_file = load_serve_file(config)
    app_cfg = serve_file.app_config()
    connect()
    info = retrieval_info(serve_file.app_name)
    inputs = encode.sample_inputs(demo_dir() / "catalog.jsonl")
    result = encode.efficiency(target, app_cfg, inputs, {"text": text, "image": image, "audio": audio},
                               info["modality_dims"], info["encoder_versions"], typer.echo)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "encode.json").write_text(json.dumps(result, indent=2))
    encode.plot(result, out_dir / "encode.png")


@bench_app.command("retrieval")
def bench_retrieval(sizes: str = "10000,100000,1000000",
                    server_sizes: str = typer.Option("100000,1000000", help="Milvus server sizes; empty to skip."),
                    server_dim: int = typer.Option(0, help="Vector dim on the server (0: the same as the rest)."),
                    out_dir: Path = RESULTS) -> None:
    """Search latency and recall@100 vs exact (in-memory index, Milvus Lite, a Milvus server), with/without a filter."""
    from fusionrec.bench import retrieval

    retrieval.run(sizes=tuple(_levels(sizes)), server_sizes=tuple(_levels(server_sizes)),
                  server_dim=server_dim or None, out_dir=out_dir)


@bench_app.command("ranking")
def bench_ranking(items: int = typer.Option(100_000, help="Catalog size."),
                  requests: int = typer.Option(500, help="Engine level: Recommend calls measured each way."),
                  candidates_n: int = typer.Option(100, help="Candidates the ranker re-scores."),
                  service: bool = typer.Option(True, help="Also measure Recommend over gRPC against the real app."),
                  service_requests: int = typer.Option(500, help="Service level: Recommend calls per phase."),
                  service_pairs: int = typer.Option(6, help="Service level: phases of ranking off and on, each "
                                                            "(switched in place, which goes first alternating)."),
                  config: Path = typer.Option(None, help="Serve config for the service level (default: local.yaml)."),
                  out_dir: Path = RESULTS) -> None:
    """Recommend p50/p99 with and without the ranking stage, engine level then service level -> ranking.json."""
    from fusionrec.bench import ranking

    r = ranking.run(n_items=items, requests=requests, candidates_n=candidates_n, out=out_dir / "ranking.json",
                    progress=typer.echo, service=service, service_requests=service_requests,
                    service_pairs=service_pairs, config=config)
    for level in ("engine", "service"):
        if level in r:
            x = r[level]
            typer.echo(f"{level} level, {items} items: retrieval-only p50 {x['retrieval']['p50_ms']:.2f} / p99 "
                       f"{x['retrieval']['p99_ms']:.2f} ms; with ranking p50 {x['ranking']['p50_ms']:.2f} / p99 "
                       f"{x['ranking']['p99_ms']:.2f} ms (p50 ratio {x['p50_ratio']:.2f}, p99 ratio {x['p99_ratio']:.2f})")


@bench_app.command("train")
def bench_train(items: int = typer.Option(100_000, help="Synthetic catalog size."),
                interactions: int = typer.Option(1_000_000, help="Synthetic interactions (users: 1 per 20)."),
                epochs: int = 2, batch_users: int = 1024, negatives: int = 4096,
                eval_users: int = typer.Option(2000, help="Users ranked for valid/test Recall@20."),
                threads: int = typer.Option(0, help="torch/faiss threads (0: their default, every core)."),
                export: bool = typer.Option(True, help="Also export the checkpoint and load it as a replica does."),
                out_dir: Path = RESULTS) -> None:
    """Train the fusion model on a synthetic catalog (no service): seconds per epoch, peak RSS -> train_scale.json."""
    from fusionrec.bench.train_scale import run_train_scale

    r = run_train_scale(items, interactions, out_dir, epochs=epochs, batch_users=batch_users, negatives=negatives,
                        eval_users=eval_users, threads=threads, export=export, log=typer.echo)
    for key in ("items", "interactions", "seconds_per_epoch", "graph_build_s", "cold_start_s", "peak_rss_gib",
                "valid_recall@20", "mostpop_valid_recall@20", "export"):
        typer.echo(f"{key:<24} {r.get(key)}")
    typer.echo(f"wrote {out_dir / 'train_scale.json'}")


@bench_app.command("swap")
def bench_swap(config: Path = CONFIG, items: int = typer.Option(10_000, help="Stored items with image content."),
               users: int = 200, baseline_s: float = 20.0,
               load_share: float = typer.Option(0.2, help="Open-loop Recommend rate, as a share of the capacity "
                                                             "(4 closed-loop callers; at 0.5, 2 cores queue)."),
               concurrency: int = typer.Option(2, help="Re-encoding calls in flight."),
               niceness: int = typer.Option(19, help="Niceness of the incoming encoder's replica, at least "
                                                     "(Ray starts every replica at 15)."),
               out_dir: Path = RESULTS) -> None:
    """Swap the image encoder (Lite0 -> Lite2) under a steady Recommend load: bench/results/swap.{json,png}."""
    from fusionrec.bench.swap import run_swap

    run_swap(config, out_dir, n_items=items, n_users=users, baseline_s=baseline_s, load_share=load_share,
             concurrency=concurrency, niceness=niceness, log=typer.echo)


@bench_app.command("autoscale")
def bench_autoscale(config: Path = CONFIG, callers: int = typer.Option(8, help="Peak callers per query modality."),
                    hold_s: float = 90.0, target: Optional[str] = typer.Option(
                        None, "--target", "-t", help="A running service (default: start one on a fresh store)."),
                    out_dir: Path = RESULTS) -> None:
    """Ramp text/image/audio query load up and down; replicas per deployment over time: bench/results/autoscale.*"""
    from fusionrec.bench.autoscale import AutoscalePlan, run_autoscale

    result = run_autoscale(config, out_dir, AutoscalePlan(callers_per_modality=callers, hold_s=hold_s), target,
                           log=typer.echo)
    typer.echo(f"every autoscaled deployment went min -> max -> min: {result['went_min_max_min']}")


@bench_app.command("frontdoor")
def bench_frontdoor(config: Path = CONFIG, levels: str = "1,4,16,32", duration_s: float = 8.0,
                    out_dir: Path = RESULTS) -> None:
    """Serve's native gRPC proxy vs the in-replica grpc.aio front door, both over no-op deployments."""
    import socket

    from fusionrec.v1 import recommender_pb2 as pb
    from fusionrec.bench import load
    from fusionrec.bench.floor import build_floor_app
    from fusionrec.bench.frontdoor import start_proxied
    from fusionrec.bench.suite import _table
    from fusionrec.gateway.runtime import start, stop

    mix = [("by_user", [pb.RecommendRequest(user_id=f"u{i}", k=10) for i in range(50)], 1.0)]
    curves = {}
    running = start(config, overrides={"server": {"port": 0}}, builder=build_floor_app)
    try:
        curves["grpc.aio in the Gateway replica"] = load.closed_loop(running.target, mix, _levels(levels), duration_s)
    finally:
        stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_proxied(config, port)
    try:
        target = f"127.0.0.1:{port}"
        app_metadata = (("application", "fusionrec"),)  # the proxy routes by this key
        Client(target).stub.Recommend(mix[0][1][0], timeout=60, metadata=app_metadata)
        curves["Serve gRPC proxy"] = load.closed_loop(target, mix, _levels(levels), duration_s, metadata=app_metadata)
    finally:
        stop()
    for name, results in curves.items():
        _table(name, results, typer.echo)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "frontdoor.json").write_text(json.dumps({k: load.as_dicts(v) for k, v in curves.items()}, indent=2))
    load.plot_curves(curves, out_dir / "frontdoor.png", "Front door over no-op deployments")


@bench_app.command("gateway-kill")
def bench_gateway_kill(config: Path = CONFIG, channels: int = typer.Option(8, help="Callers of each kind."),
                       after_s: float = typer.Option(10.0, help="Load kept up after the kill."),
                       out_dir: Path = RESULTS) -> None:
    """Kill -9 one of the Gateway replicas sharing the port under load: the outage callers see (gateway_kill.json)."""
    import socket
    import time

    from fusionrec.bench.floor import build_floor_app
    from fusionrec.bench.gateway_kill import KillResult, measure_kill
    from fusionrec.gateway.runtime import ready_everywhere, start, stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running = start(config, overrides={"server": {"port": port, "metrics_port": 0}}, builder=build_floor_app)
    try:
        from ray import serve

        pids = [g["pid"] for g in running.info["gateways"]]
        outage = measure_kill(running.target, pids[0], channels=channels, after_s=after_s)
        t0, back_s = time.monotonic(), None
        while back_s is None and time.monotonic() - t0 < 120:  # Serve replaces the killed replica
            found = ready_everywhere(serve.get_app_handle(running.app_name), running.app_name, timeout_s=60)
            if len({g["pid"] for g in found["gateways"]} - {pids[0]}) >= len(pids):
                back_s = after_s + time.monotonic() - t0
            time.sleep(0.5)
    finally:
        stop()
    result = KillResult(len(pids), pids[0], outage, back_s).as_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gateway_kill.json").write_text(json.dumps(result, indent=2))
    for kind, o in outage.items():
        typer.echo(f"{kind:<16} outage {o['outage_s']:.3f} s, {o['failed_after_kill']} of {o['calls_after_kill']} "
                   "calls failed after the kill")
    typer.echo(f"replacement replica ready {back_s} s after the kill; wrote {out_dir / 'gateway_kill.json'}")


@bench_app.command("reliability")
def bench_reliability(config: Path = CONFIG,
                      soak_s: float = typer.Option(600.0, help="Mixed soak length (0 skips it)."),
                      soak_warmup_s: float = typer.Option(60.0, help="Soak traffic before RSS is first measured."),
                      overload_s: float = typer.Option(20.0, help="Open-loop overload length (0 skips it)."),
                      overload_deadline_ms: float = typer.Option(1000.0, help="Deadline of every overload call."),
                      kill: str = typer.Option(",".join(DEPLOYMENTS),
                                               help="Deployments whose replica is killed -9 in turn (empty: none)."),
                      whole_tree: bool = typer.Option(True, help="Also kill -9 the whole process tree and restart."),
                      hostile: bool = typer.Option(True, help="Run the hostile-input suite."),
                      out_dir: Path = typer.Option(Path("reports"), help="Where reliability.* go.")) -> None:
    """Hostile input, faults under load, 2x overload and a soak on a fresh service: reports/reliability.*"""
    from fusionrec.bench.reliability.suite import ReliabilityPlan, run_reliability

    plan = ReliabilityPlan(hostile=hostile, kill=tuple(k for k in kill.split(",") if k.strip()),
                           whole_tree=whole_tree, overload_s=overload_s, overload_deadline_ms=overload_deadline_ms,
                           soak_s=soak_s, soak_warmup_s=soak_warmup_s)
    rep = run_reliability(config, out_dir, plan, log=typer.echo)
    for v in rep["verdicts"]:
        typer.echo(f"{v['key']:<32} {v['value']!s:<24} goal {v['goal']:<8} {'pass' if v['pass'] else 'FAIL'}")
    typer.echo(f"wrote {out_dir / 'reliability.json'} and {out_dir / 'reliability.md'}")
