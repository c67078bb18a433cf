"""`fusionrec bench swap`: swap the image encoder (EfficientNet-Lite0 -> Lite2) while a steady Recommend load
runs, on a fresh store of N items with kept image content; bench/results/swap.{json,png}.

The load is open-loop (Poisson arrivals) at a stated share of the capacity measured just before, from its
own process, so the swap driver's work does not delay it and a slow answer does not slow the arrivals
(latency counts from the scheduled start). The raw encoder rate is measured as the re-encoding runs:
alone in a process at the same torch threads (1), niceness and batch size (the best of 1/2/4/8 there,
which the re-encoding then uses), before and after the swap, the higher kept."""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fusionrec.cli.client import Client
from fusionrec.v1 import recommender_pb2 as pb

Log = Callable[[str], None]
INCOMING = {"name": "efficientnet-lite2", "options": {"num_threads": 1}}
RAW_BATCHES = (1, 2, 4, 8)
#: Ray starts every worker process, Serve replicas included, at this niceness (raylet setting worker_niceness)
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))
#: Pause between the capacity probe and the steady load (> admission's 2 s offered-rate window), so the
#: load's first requests are not judged by the probe's saturating arrivals.
SETTLE_S = 5.0
PHASES = (("re-encode", "swapping "), ("refit + commit", "re-encoded "), ("adopt", "switched: "))
SLOWEST = 15  # slowest answers of the swap listed with their times


def variant(image: bytes, k: int) -> bytes:
    """A distinct JPEG per ``k``: the image cropped by a deterministic 0-6 px offset on each side."""
    from PIL import Image

    img = Image.open(io.BytesIO(image)).convert("RGB")
    dx, dy = divmod(k % 49, 7)
    w, h = img.size
    buf = io.BytesIO()
    img.crop((dx, dy, w - 6 + dx, h - 6 + dy)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _seed(client: Client, images: list[bytes], n_items: int, n_users: int, log: Log) -> list[str]:
    """n_items items, each with a distinct image (sample photos varied), 4 upserts in flight, and users."""
    t0 = time.monotonic()

    def upsert(start: int) -> None:
        batch = [pb.ItemInput(item_id=f"swap-{k:06d}", content=pb.Content(
            image=variant(images[k % len(images)], k // len(images)))) for k in range(start, min(n_items, start + 16))]
        client.stub.UpsertItems(pb.UpsertItemsRequest(items=batch), timeout=600)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(upsert, range(0, n_items, 16)))
    rng = np.random.default_rng(5)
    users = [f"swap-user-{u:04d}" for u in range(n_users)]
    events = [pb.Interaction(user_id=u, item_id=f"swap-{int(k):06d}", kind="view", timestamp_s=1e9 + j)
              for u in users for j, k in enumerate(rng.choice(n_items, size=10, replace=False))]
    client.stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=events), timeout=600)
    log(f"seeded {n_items} items with distinct images ({n_items / (time.monotonic() - t0):.1f} items/s), "
        f"{n_users} users")
    return users


async def _open_loop(target: str, users: list[str], rate_per_s: float, stop: Any, ready: Any,
                     t0: float, messages: dict[int, str]) -> list[tuple]:
    import grpc

    from fusionrec.v1 import recommender_pb2_grpc as pb_grpc

    rng = np.random.default_rng(11)
    samples: list[tuple[float, float, int]] = []  # (start s, latency ms, grpc status code: 0 = OK)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        await channel.channel_ready()
        ready.set()

        async def call(t_at: float, user: str) -> None:
            code = 0
            try:
                await stub.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=10)
            except grpc.aio.AioRpcError as err:
                code = err.code().value[0]
                if code not in messages:
                    messages[code] = f"{err.code().name}: {err.details()}"
            samples.append((t_at - t0, (time.monotonic() - t_at) * 1000, code))

        tasks, t_next = set(), time.monotonic()
        while not stop.is_set():
            t_next += rng.exponential(1 / rate_per_s)
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))
            task = asyncio.create_task(call(t_next, str(rng.choice(users))))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return samples


def _load_process(target: str, users: list[str], rate_per_s: float, stop: Any, ready: Any, t0: float,
                  out: str) -> None:
    messages: dict[int, str] = {}
    samples = asyncio.run(_open_loop(target, users, rate_per_s, stop, ready, t0, messages))
    np.save(out, np.array(samples, dtype=float).reshape(-1, 3))
    Path(out).with_suffix(".errors.json").write_text(json.dumps(messages))


class Load:
    """Open-loop Recommend load in its own process; ``samples``: (start s since t0, latency ms, ok)."""

    def __init__(self, target: str, users: list[str], rate_per_s: float, t0: float, out: Path) -> None:
        ctx = mp.get_context("spawn")
        self.stop, self.ready, self.out = ctx.Event(), ctx.Event(), out
        self.proc = ctx.Process(target=_load_process, daemon=True,
                                args=(target, users, rate_per_s, self.stop, self.ready, t0, str(out)))
        self.samples: list[tuple[float, float, bool]] = []
        self.errors: dict[str, str] = {}

    def start(self) -> None:
        self.proc.start()
        if not self.ready.wait(300):
            raise TimeoutError("the load process did not connect")

    def finish(self) -> None:
        self.stop.set()
        self.proc.join(timeout=60)
        self.samples = [(t, ms, code == 0) for t, ms, code in np.load(self.out)]
        errors = Path(self.out).with_suffix(".errors.json")
        #: one message per failing status code (the first seen), keyed by the code's name
        self.errors = {m.split(":")[0]: m for m in json.loads(errors.read_text()).values()} if errors.exists() else {}

    def window(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        return [s for s in self.samples if start <= s[0] < end]


def _p99(samples: list[tuple[float, float, bool]]) -> float:
    ok = [ms for _, ms, good in samples if good]
    return float(np.percentile(ok, 99)) if ok else float("nan")


def capacity(target: str, users: list[str], callers: int = 4, duration_s: float = 8.0) -> float:
    """Recommend requests/s that ``callers`` closed-loop callers reach (the load's 100 %)."""
    from fusionrec.bench.load import closed_loop

    requests = [pb.RecommendRequest(user_id=u, k=10) for u in users]
    return closed_loop(target, [("user", requests, 1.0)], [callers], duration_s, timeout_s=10)[0].qps


def _raw_child(images: list[bytes], batch_sizes: tuple[int, ...], n_items: int, niceness: int) -> dict[int, float]:
    import torch

    from fusionrec.bench.encode import raw_throughput

    os.nice(max(niceness, RAY_WORKER_NICENESS) - os.nice(0))  # where the replica runs (Ray starts it at 15)
    torch.set_num_threads(INCOMING["options"]["num_threads"])
    return raw_throughput(INCOMING["name"], {}, images, n_items, batch_sizes=batch_sizes)[1]


def raw_rates(images: list[bytes], batch_sizes: tuple[int, ...] = RAW_BATCHES, n_items: int = 96,
              niceness: int = 0) -> dict[int, float]:
    """items/s of the incoming encoder by batch size, at its replica's torch threads and niceness (in a
    process of its own: both are per process)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_raw_child, (images, batch_sizes, n_items, niceness))


def run_swap(config: Path, out_dir: Path, n_items: int = 10_000, n_users: int = 200, baseline_s: float = 20.0,
             load_share: float = 0.2, concurrency: int = 2, niceness: int = 19, log: Log = print) -> dict[str, Any]:
    """Seed, measure capacity and the raw incoming encoder, then swap under load; writes the summary."""
    from fusionrec.bench.encode import sample_inputs
    from fusionrec.cli.sample_catalog import generate_catalog
    from fusionrec.core.paths import shared_path
    from fusionrec.gateway.config import EncoderConfig
    from fusionrec.gateway.runtime import start, stop
    from fusionrec.gateway.swap import SwapSettings, swap_encoder

    with tempfile.TemporaryDirectory() as tmp:
        files = generate_catalog(Path(tmp) / "demo", shared_path("media"), n_items=240, n_users=1)
        images = sample_inputs(files.catalog_path)["image"]
        overrides = {"server": {"port": 0}, "store": {"uri": str(Path(tmp) / "swap.db"),
                                                      "content_uri": str(Path(tmp) / "content")}}
        running = start(config, overrides=overrides)
        try:
            users = _seed(Client(running.target), images, n_items, n_users, log)
            by_batch = raw_rates(images, niceness=niceness)
            best = max(by_batch, key=by_batch.get)
            log(f"raw {INCOMING['name']} at 1 thread, items/s by batch size: {by_batch}; the swap uses {best}")
            rate = load_share * capacity(running.target, users)
            log(f"steady load: {rate:.1f} Recommend/s ({load_share:.0%} of the capacity)")
            time.sleep(SETTLE_S)  # the probe ran at capacity: admission's offered-rate window must forget it
            settings = SwapSettings(max_batch_size=best, concurrency=concurrency, niceness=niceness)
            result = _swap_under_load(running, users, rate, Path(tmp) / "load.npy", log, lambda echo: swap_encoder(
                "image", EncoderConfig(**INCOMING), config, overrides=overrides, app_name=running.app_name,
                echo=echo, settings=settings), baseline_s)
            raw = max(by_batch[best], raw_rates(images, (best,), niceness=niceness)[best])  # before / after
        finally:
            stop()
    result |= {"raw_encoder_items_per_s": round(raw, 2), "raw_by_batch_1_thread": by_batch,
               "reembed_vs_raw": round(result["reembed_items_per_s"] / raw, 3), "items": n_items, "users": n_users,
               "load_share_of_capacity": load_share, "load_rate_per_s": round(rate, 1),
               "date": time.strftime("%Y-%m-%d %H:%M")}
    log(json.dumps(summary(result), indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "swap.json").write_text(json.dumps(summary(result), indent=2))
    plot(result, out_dir / "swap.png")
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("timeline", "replicas")}


def _swap_under_load(running: Any, users: list[str], rate: float, out: Path, log: Log,
                     swap: Callable[[Log], dict], baseline_s: float) -> dict[str, Any]:
    from fusionrec.bench.autoscale import ReplicaPoller
    from fusionrec.gateway.routing import swap_app_name
    from fusionrec.gateway.runtime import replica_ids

    t0, t0_unix = time.monotonic(), time.time()
    marks: list[tuple[float, str]] = []

    def echo(line: str) -> None:
        marks.append((time.monotonic() - t0, line))
        log(line)

    pollers = [ReplicaPoller(app, 1.0, t0) for app in (running.app_name, swap_app_name(running.app_name, "image"))]
    load = Load(running.target, users, rate, t0, out)
    before_ids = replica_ids(running.app_name)
    for p in pollers:
        p.start()
    load.start()
    time.sleep(baseline_s)
    t_swap = time.monotonic() - t0
    report = swap(echo)
    t_end = time.monotonic() - t0
    time.sleep(5)
    load.finish()
    for p in pollers:
        p.stop.set()
    after_ids = replica_ids(running.app_name)
    others = [n for n in before_ids if n != "ImageEncoder"]
    before, during = load.window(t_swap - baseline_s, t_swap), load.window(t_swap, t_end)
    return {
        "failed_requests": sum(not ok for _, _, ok in load.samples), "requests": len(load.samples),
        "failed_examples": load.errors,
        "failed_at_s": _failure_spans(load.samples),
        "recommend_p99_before_ms": round(_p99(before), 2), "recommend_p99_during_ms": round(_p99(during), 2),
        "recommend_p99_ratio_during_swap": round(_p99(during) / _p99(before), 3),
        "reembed_items_per_s": report["reembed_items_per_s"], "reembedded_items": report["reembedded_items"],
        "swap_total_s": report["swap_total_s"], "switch_s": report["switch_s"],
        "other_deployments_restarted": sum(before_ids[n] != after_ids.get(n) for n in others),
        "from": report["from"], "to": report["to"], "settings": report["settings"],
        "phases": _phases(load, marks, t_swap, t_end), "swap_window_s": (round(t_swap, 2), round(t_end, 2)),
        # where the slow answers fall among the driver's steps (s since the load started, as "timeline")
        "steps_at_s": {k: round(t_swap + v, 2) for k, v in report.get("steps_s", {}).items()},
        "slowest_during_swap": [(round(t, 2), round(ms, 1)) for t, ms, _ in
                                sorted(load.window(t_swap, t_end), key=lambda x: -x[1])[:SLOWEST]],
        "load_started_unix_s": round(t0_unix, 3),
        "timeline": load.samples,
        "replicas": {f"{name} ({'swap' if i else 'app'})": rows for i, p in enumerate(pollers)
                     for name, rows in p.samples.items()}}


def _failure_spans(samples: list[tuple[float, float, bool]], gap_s: float = 2.0) -> list[list[float]]:
    """[first, last, count] of each run of failed calls (failures less than ``gap_s`` apart join one run)."""
    spans: list[list[float]] = []
    for t, _, ok in sorted(samples):
        if ok:
            continue
        if spans and t - spans[-1][1] < gap_s:
            spans[-1][1:] = [round(t, 2), spans[-1][2] + 1]
        else:
            spans.append([round(t, 2), round(t, 2), 1])
    return spans


def _phases(load: Load, marks: list[tuple[float, str]], t_swap: float, t_end: float) -> dict[str, dict]:
    """Recommend p99 and requests per phase of the swap, the phases found in the swap's progress lines."""
    found = [(name, next((t for t, line in marks if line.startswith(prefix)), None)) for name, prefix in PHASES]
    starts = [("start incoming", t_swap)] + [(name, t) for name, t in found if t is not None]
    out = {}
    for (name, a), b in zip(starts, [t for _, t in starts[1:]] + [t_end]):
        window = load.window(a, b)
        out[name] = {"from_s": round(a, 1), "to_s": round(b, 1), "requests": len(window),
                     "p99_ms": round(_p99(window), 2)}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Recommend latency over time with the swap's phases shaded, and replicas per deployment below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_r) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    t = np.array([s[0] for s in result["timeline"]])
    ms = np.array([s[1] for s in result["timeline"]])
    ax.plot(t, ms, ".", markersize=2, alpha=0.4, label=f"Recommend latency ({result['load_rate_per_s']}/s open loop)")
    for (name, phase), colour in zip(result["phases"].items(), ("grey", "orange", "red", "green")):
        ax.axvspan(phase["from_s"], phase["to_s"], color=colour, alpha=0.15, label=f"{name}: p99 {phase['p99_ms']} ms")
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title(f"image encoder swap {result['from']} -> {result['to']} at {result['items']} items:\n"
                 f"p99 x{result['recommend_p99_ratio_during_swap']}, {result['failed_requests']} failed, "
                 f"re-embed {result['reembed_vs_raw']} of raw, {result['swap_total_s']} s", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    for name, rows in sorted(result["replicas"].items()):
        if rows:
            ax_r.step([r[0] for r in rows], [r[1] for r in rows], where="post", label=name)
    ax_r.set_ylabel("live replicas")
    ax_r.set_ylim(-0.2, 1 + max((r[1] for rows in result["replicas"].values() for r in rows), default=1))
    ax_r.yaxis.get_major_locator().set_params(integer=True)
    ax_r.set_xlabel("s since load start")
    ax_r.legend(loc="upper left", fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
