"""Serving efficiency: items/s through UpsertItems (batched by Serve) vs the raw encoder in-process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from encoders.registry import get_encoder
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from gateway.client import read_jsonl


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


async def _served(target: str, modality: str, inputs: list, n_items: int, per_call: int, concurrency: int,
                  prefix: str) -> float:
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
                items = [pb.ItemInput(item_id=f"{prefix}-{i}-{j}", content=pb.Content(**{modality: x}))
                         for j, x in enumerate(chunk)]
                await stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=600)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n_items / (time.perf_counter() - t0)


def served_throughput(target: str, modality: str, inputs: list, n_items: int, per_call: int = 16,
                      concurrency: int = 8) -> float:
    """items/s of UpsertItems carrying only `modality` content, `concurrency` calls in flight.

    A first pass of the same size warms the replicas (and lets autoscaling react) before the timed one.
    """
    asyncio.run(_served(target, modality, inputs, n_items, per_call, concurrency, f"warm-{modality}"))
    return asyncio.run(_served(target, modality, inputs, n_items, per_call, concurrency, f"enc-{modality}"))
