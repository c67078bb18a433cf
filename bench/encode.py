"""Serving efficiency: items/s through UpsertItems (batched by Serve) vs the raw encoder in-process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

from fusionrec.encoders.registry import get_encoder
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from fusionrec.cli.catalog import read_jsonl


def sample_inputs(catalog_path: Path) -> dict[str, list]:
    """modality -> raw inputs (str or bytes) taken from a sample catalog."""
    rows = list(read_jsonl(catalog_path))
    base = catalog_path.parent
    return {"text": [r["text"] for r in rows],
            "image": [(base / r["image"]).read_bytes() for r in rows],
            "audio": [(base / r["audio"]).read_bytes() for r in rows]}


def raw_throughput(encoder_name: str, options: dict, inputs: list, n_items: int,
                   batch_sizes: tuple[int, ...] = (8, 16, 32, 64)) -> tuple[float, dict[int, float]]:
    """Best items/s of encoder.encode over batch sizes (torch's default threads: all cores)."""
    opts = {k: v for k, v in options.items() if k != "num_threads"}
    encoder = get_encoder(encoder_name, **opts)
    encoder.warmup()
    data = (inputs * (n_items // len(inputs) + 1))[:n_items]
    by_batch = {}
    for bs in batch_sizes:
        encoder.encode(data[:bs])
        t0 = time.perf_counter()
        for i in range(0, n_items, bs):
            encoder.encode(data[i:i + bs])
        by_batch[bs] = n_items / (time.perf_counter() - t0)
    return max(by_batch.values()), by_batch


ItemFactory = Callable[[str, Any], pb.ItemInput]


async def _served(target: str, inputs: list, n_items: int, per_call: int, concurrency: int, prefix: str,
                  make_item: ItemFactory) -> float:
    data = (inputs * (n_items // len(inputs) + 1))[:n_items]
    calls = [data[i:i + per_call] for i in range(0, n_items, per_call)]
    queue: asyncio.Queue = asyncio.Queue()
    for i, chunk in enumerate(calls):
        queue.put_nowait((i, chunk))
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.RecommenderStub(channel)

        async def worker() -> None:
            while not queue.empty():
                i, chunk = queue.get_nowait()
                items = [make_item(f"{prefix}-{i}-{j}", x) for j, x in enumerate(chunk)]
                await stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=600)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n_items / (time.perf_counter() - t0)


def _timed(target: str, inputs: list, n_items: int, per_call: int, concurrency: int, prefix: str,
           make_item: ItemFactory, warm_s: float) -> float:
    """Warm passes of the same load for at least `warm_s` (replicas load, autoscaling settles), then the timed one."""
    t0, round_ = time.monotonic(), 0
    while True:
        asyncio.run(_served(target, inputs, n_items, per_call, concurrency, f"warm{round_}-{prefix}", make_item))
        round_ += 1
        if time.monotonic() - t0 >= warm_s:
            break
    return asyncio.run(_served(target, inputs, n_items, per_call, concurrency, prefix, make_item))


def served_throughput(target: str, modality: str, inputs: list, n_items: int, per_call: int = 16,
                      concurrency: int = 8, warm_s: float = 10.0) -> float:
    """items/s of UpsertItems carrying only `modality` content, `concurrency` calls in flight."""
    def make_item(item_id: str, x: Any) -> pb.ItemInput:
        return pb.ItemInput(item_id=item_id, content=pb.Content(**{modality: x}))

    return _timed(target, inputs, n_items, per_call, concurrency, f"enc-{modality}", make_item, warm_s)


def store_path_throughput(target: str, modality: str, dim: int, encoder_version: str, n_items: int,
                          per_call: int = 16, concurrency: int = 8, warm_s: float = 2.0) -> float:
    """items/s of the same UpsertItems load carrying a precomputed `modality` vector instead of content.

    Everything the served path does except encoding (gRPC, fusion, the Milvus write, the search
    index): with raw encode throughput it bounds what the served path can reach on shared cores.
    """
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((64, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

    def make_item(item_id: str, v: np.ndarray) -> pb.ItemInput:
        return pb.ItemInput(item_id=item_id, vectors=[pb.ModalityVector(modality=modality, values=v,
                                                                        encoder_version=encoder_version)])

    return _timed(target, list(vecs), n_items, per_call, concurrency, f"byo-{modality}", make_item, warm_s)


def efficiency(target: str, app_cfg: Any, inputs: dict[str, list], n_items: dict[str, int],
               modality_dims: dict[str, int], encoder_versions: dict[str, str],
               log: Callable[[str], None] = print) -> dict[str, dict]:
    """Per modality: served, store-path and raw items/s, and served/raw (the serving efficiency).

    `bound_items_per_s` = 1 / (1/raw + 1/store_path): what the served path would reach if encoding
    and the rest of the path shared the cores with no other loss.
    """
    out = {}
    for modality, n in n_items.items():
        served = served_throughput(target, modality, inputs[modality], n)
        store = store_path_throughput(target, modality, modality_dims[modality], encoder_versions[modality], n)
        enc_cfg = app_cfg.encoders[modality]
        # Same options as the replica (device included), so the raw baseline runs where the replica does.
        raw, by_batch = raw_throughput(enc_cfg.name, dict(enc_cfg.options), inputs[modality], n)
        bound = 1 / (1 / raw + 1 / store)
        out[modality] = {"served_items_per_s": served, "raw_items_per_s": raw, "raw_by_batch": by_batch,
                         "store_path_items_per_s": store, "bound_items_per_s": bound,
                         "efficiency": served / raw, "efficiency_vs_bound": served / bound}
        log(f"encode {modality}: served {served:.1f}/s, raw {raw:.1f}/s -> {served / raw:.2f} "
            f"(store path alone {store:.1f}/s; shared-core bound {bound:.1f}/s)")
    return out


def plot(result: dict[str, dict], path: Path) -> None:
    """Bars per modality: raw encoder, shared-core bound, served path, store path alone (items/s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("raw encoder (in-process)", "raw_items_per_s"), ("shared-core bound", "bound_items_per_s"),
              ("served (UpsertItems)", "served_items_per_s"), ("store path alone (precomputed)", "store_path_items_per_s")]
    modalities = list(result)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.2
    for j, (label, key) in enumerate(series):
        xs = [i + (j - 1.5) * width for i in range(len(modalities))]
        ax.bar(xs, [result[m][key] for m in modalities], width, label=label)
    for i, m in enumerate(modalities):
        ax.annotate(f"{result[m]['efficiency']:.2f}", (i, result[m]["served_items_per_s"]), ha="center",
                    va="bottom", fontsize=9)
    ax.set_xticks(range(len(modalities)), modalities)
    ax.set_yscale("log")
    ax.set_ylabel("items/s (log)")
    ax.set_title("Serving efficiency: served / raw (annotated)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
