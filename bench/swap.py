"""`fusionrec bench swap`: swap the image encoder (EfficientNet-Lite0 -> Lite2) while a steady Recommend load
runs, on a fresh store of N items with kept image content; bench/results/swap.{json,png}."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fusionrec.bench.encode import raw_throughput, sample_inputs
from fusionrec.cli.client import Client
from fusionrec.v1 import recommender_pb2 as pb

Log = Callable[[str], None]
INCOMING = {"name": "efficientnet-lite2", "options": {"num_threads": 1}}


class Load(threading.Thread):
    """Closed-loop by-user Recommend calls; every call's (start time, latency ms, ok)."""

    def __init__(self, target: str, users: list[str], callers: int = 2) -> None:
        super().__init__(daemon=True)
        self.client, self.users, self.callers = Client(target), users, callers
        self.samples: list[tuple[float, float, bool]] = []
        self.stop = threading.Event()

    def _caller(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self.client.stub.Recommend(pb.RecommendRequest(user_id=str(rng.choice(self.users)), k=10), timeout=10)
                ok = True
            except Exception:
                ok = False
            self.samples.append((t0, (time.monotonic() - t0) * 1000, ok))

    def run(self) -> None:
        threads = [threading.Thread(target=self._caller, args=(i,), daemon=True) for i in range(self.callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def window(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        return [s for s in self.samples if start <= s[0] < end]


def _seed(client: Client, images: list[bytes], n_items: int, n_users: int, log: Log) -> list[str]:
    """n_items items with image content (the sample photos, cycled) and n_users users' histories."""
    rng = np.random.default_rng(5)
    t0 = time.monotonic()
    for start in range(0, n_items, 32):
        batch = [pb.ItemInput(item_id=f"swap-{k:06d}", content=pb.Content(image=images[k % len(images)]))
                 for k in range(start, min(n_items, start + 32))]
        client.stub.UpsertItems(pb.UpsertItemsRequest(items=batch), timeout=600)
    users = [f"swap-user-{u:04d}" for u in range(n_users)]
    events = [pb.Interaction(user_id=u, item_id=f"swap-{int(k):06d}", kind="view", timestamp_s=1.0 + j)
              for u in users for j, k in enumerate(rng.choice(n_items, size=10, replace=False))]
    client.stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=events), timeout=600)
    log(f"seeded {n_items} items with images ({n_items / (time.monotonic() - t0):.1f} items/s), {n_users} users")
    return users


def _p99(samples: list[tuple[float, float, bool]]) -> float:
    ok = [ms for _, ms, good in samples if good]
    return float(np.percentile(ok, 99)) if ok else float("nan")


def run_swap(config: Path, out_dir: Path, n_items: int = 10_000, n_users: int = 200, baseline_s: float = 20.0,
             callers: int = 2, log: Log = print) -> dict[str, Any]:
    """Seed, measure the raw incoming encoder, then swap under load; returns and writes the summary."""
    from fusionrec.cli.sample_catalog import generate_catalog
    from fusionrec.core.paths import shared_path
    from fusionrec.gateway.config import EncoderConfig
    from fusionrec.gateway.runtime import replica_ids, start, stop
    from fusionrec.gateway.swap import swap_encoder

    with tempfile.TemporaryDirectory() as tmp:
        files = generate_catalog(Path(tmp) / "demo", shared_path("media"), n_items=240, n_users=1)
        images = sample_inputs(files.catalog_path)["image"]
        overrides = {"server": {"port": 0}, "store": {"uri": str(Path(tmp) / "swap.db"),
                                                      "content_uri": str(Path(tmp) / "content")}}
        running = start(config, overrides=overrides)
        try:
            users = _seed(Client(running.target), images, n_items, n_users, log)
            raw, _ = raw_throughput(INCOMING["name"], {}, images, 256, batch_sizes=(8, 16))
            log(f"raw {INCOMING['name']}: {raw:.1f} items/s")
            result = _swap_under_load(running, users, callers, raw, log,
                                      lambda: swap_encoder("image", EncoderConfig(**INCOMING), config,
                                                           overrides=overrides, app_name=running.app_name, echo=log),
                                      baseline_s, replica_ids)
        finally:
            stop()
    result.update({"items": n_items, "users": n_users, "date": time.strftime("%Y-%m-%d %H:%M")})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "swap.json").write_text(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=2))
    plot(result, out_dir / "swap.png")
    return result


def _swap_under_load(running: Any, users: list[str], callers: int, raw: float, log: Log,
                     swap: Callable[[], dict], baseline_s: float, replica_ids: Callable[[str], dict]) -> dict[str, Any]:
    load = Load(running.target, users, callers)
    before_ids = replica_ids(running.app_name)
    load.start()
    time.sleep(baseline_s)
    t_swap = time.monotonic()
    report = swap()
    t_end = time.monotonic()
    time.sleep(5)
    load.stop.set()
    load.join(timeout=30)
    after_ids = replica_ids(running.app_name)
    others = [n for n in before_ids if n != "ImageEncoder"]
    before, during = load.window(0, t_swap), load.window(t_swap, t_end)
    t_first = load.samples[0][0] if load.samples else t_swap - baseline_s
    result = {
        "failed_requests": sum(not ok for _, _, ok in load.samples), "requests": len(load.samples),
        "recommend_p99_before_ms": round(_p99(before), 2), "recommend_p99_during_ms": round(_p99(during), 2),
        "recommend_p99_ratio_during_swap": round(_p99(during) / _p99(before), 3), "callers": callers,
        "reembed_items_per_s": report["reembed_items_per_s"], "raw_encoder_items_per_s": round(raw, 2),
        "reembed_vs_raw": round(report["reembed_items_per_s"] / raw, 3), "swap_total_s": report["swap_total_s"],
        "other_deployments_restarted": sum(before_ids[n] != after_ids.get(n) for n in others),
        "from": report["from"], "to": report["to"],
        "timeline": [(t - t_first, ms, ok) for t, ms, ok in load.samples],
        "swap_window_s": (t_swap - t_first, t_end - t_first)}
    log(json.dumps({k: v for k, v in result.items() if k not in ("timeline",)}, indent=2))
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Recommend latency over time, the swap window shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s[0] for s in result["timeline"]])
    ms = np.array([s[1] for s in result["timeline"]])
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, ms, ".", markersize=2, alpha=0.5, label="Recommend latency")
    ax.axvspan(*result["swap_window_s"], color="orange", alpha=0.2,
               label=f"swap {result['from']} -> {result['to']} ({result['swap_total_s']} s)")
    ax.set_yscale("log")
    ax.set_xlabel("s since load start")
    ax.set_ylabel("ms")
    ax.set_title(f"image encoder swap at {result['items']} items: p99 x{result['recommend_p99_ratio_during_swap']}, "
                 f"{result['failed_requests']} failed, re-embed {result['reembed_vs_raw']} of raw")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
