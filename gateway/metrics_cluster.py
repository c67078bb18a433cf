"""Metrics whose values live in other replicas, gathered by the Gateway for its one /metrics endpoint.

The encoder and Retrieval deployments keep plain counters (`EncoderLoad`, `StoreProgress`, no Ray, no
prometheus_client) and answer a small `stats()` call. `ClusterCollector` pulls them on scrape, at
most once per `refresh_s`, waiting at most `wait_s` (then it answers with the last values it has), so
a scrape never blocks long and nothing is pulled while nobody scrapes. Encoder values are per replica
(a `replica` label): a handle call reaches one replica, so several calls go out per pull and each
replica's series keeps its own monotonic counts; a replica unseen for `expire_s` is dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

log = logging.getLogger("ray.serve")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
Pull = Callable[[], Awaitable[dict[str, Any]]]


class EncoderLoad:
    """An encoder replica's batch sizes (cumulative histogram) and its inputs waiting for or in a batch."""

    def __init__(self) -> None:
        self.bucket_counts = [0] * len(BATCH_BUCKETS)  # per bucket, not cumulative; larger ones in none
        self.batches = 0
        self.inputs = 0
        self.pending = 0

    def batch(self, size: int) -> None:
        self.batches += 1
        self.inputs += size
        for i, bound in enumerate(BATCH_BUCKETS):
            if size <= bound:
                self.bucket_counts[i] += 1
                break

    @contextlib.contextmanager
    def waiting(self, n: int) -> Iterator[None]:
        """Around awaiting ``n`` inputs' results: cancelled callers leave the count too."""
        self.pending += n
        try:
            yield
        finally:
            self.pending -= n

    def snapshot(self, replica: str, modality: str) -> dict[str, Any]:
        return {"replica": replica, "modality": modality, "pending": self.pending, "batches": self.batches,
                "inputs": self.inputs, "bucket_counts": list(self.bucket_counts)}


class CountingModel:
    """A fusion model that counts the items it fuses. The engine fuses a re-index batch by batch through
    ``item_vectors``, so this gives progress without the engine knowing about it."""

    def __init__(self, model: Any, on_items: Callable[[int], None]) -> None:
        self._model = model
        self._on_items = on_items

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def item_vectors(self, items: list, item_ids: list[str] | None = None) -> Any:
        out = self._model.item_vectors(items, item_ids)
        self._on_items(len(items))
        return out


class StoreProgress:
    """Progress of re-indexes (and swap commits, which re-index) and of encoder swaps' re-encoding, in the
    Retrieval replica. Swap totals come from `swap_status` (begin/resume); shadow writes add to them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # re-indexes count from a worker thread
        self.reindex: dict[str, Any] = {}
        self.swaps: dict[str, dict[str, int]] = {}

    def reindexing(self, kind: str, total: int, model: Any) -> CountingModel:
        """Start a re-index of ``total`` items; returns ``model`` counting its progress."""
        with self._lock:
            self.reindex = {"kind": kind, "running": True, "done": 0, "total": int(total)}

        def on_items(n: int) -> None:
            with self._lock:
                self.reindex["done"] += n
        return CountingModel(model, on_items)

    def reindex_finished(self) -> None:
        with self._lock:
            self.reindex["running"] = False

    def swap_status(self, status: dict[str, Any]) -> None:
        with self._lock:
            self.swaps[status["modality"]] = {"items": int(status["items"]), "done": int(status["done"])}

    def shadow_written(self, modality: str, n: int) -> None:
        with self._lock:
            if modality in self.swaps:
                s = self.swaps[modality]
                s["done"] = min(s["items"], s["done"] + n)

    def snapshot(self, active_swaps: dict[str, str]) -> dict[str, Any]:
        """``active_swaps``: modality -> incoming version (RetrievalEngine.swaps); others are forgotten."""
        with self._lock:
            self.swaps = {m: s for m, s in self.swaps.items() if m in active_swaps}
            swaps = {m: dict(self.swaps.get(m, {"items": 0, "done": 0})) for m in active_swaps}
            return {"reindex": dict(self.reindex), "swaps": swaps}


async def _call(handle: Any, method: str, timeout_s: float) -> Any:
    async def awaited() -> Any:
        return await getattr(handle, method).remote()
    return await asyncio.wait_for(awaited(), timeout_s)


def handle_puller(encoders: dict[str, Any], fusion: Any, retrieval: Any, fanout: int = 4,
                  timeout_s: float = 2.0) -> Pull:
    """A pull over DeploymentHandles (duck-typed: ``.stats.remote()``): ``fanout`` concurrent calls per
    encoder deployment, so that each of its replicas is likely reached."""
    async def pull() -> dict[str, Any]:
        calls = [_call(h, "stats", timeout_s) for h in encoders.values() for _ in range(fanout)]
        calls += [_call(retrieval, "stats", timeout_s), _call(fusion, "info", timeout_s)]
        *enc, store, fusion_info = await asyncio.gather(*calls, return_exceptions=True)
        errors = sum(isinstance(r, BaseException) for r in (*enc, store, fusion_info))
        return {"encoders": [r for r in enc if isinstance(r, dict)], "errors": errors,
                "store": store if isinstance(store, dict) else None,
                "fusion_version": fusion_info["version"] if isinstance(fusion_info, dict) else None}
    return pull


class ClusterCollector:
    """A prometheus_client collector over pulled replica stats (see the module docstring)."""

    def __init__(self, pull: Pull, loop: asyncio.AbstractEventLoop, refresh_s: float = 5.0, wait_s: float = 1.0,
                 expire_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._pull, self._loop, self._clock = pull, loop, clock
        self.refresh_s, self.wait_s, self.expire_s = refresh_s, wait_s, expire_s
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future | None = None
        self.pulled_at: float | None = None
        self.errors = 0
        self.encoders: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
        self.store: dict[str, Any] | None = None
        self.stale_since: float | None = None

    def describe(self) -> list[Metric]:
        return []  # no pull at registration time

    def refresh(self) -> None:
        """Pull if the values are older than ``refresh_s``; wait for it at most ``wait_s`` (any thread)."""
        with self._lock:
            if self.pulled_at is not None and self._clock() - self.pulled_at < self.refresh_s:
                return
            if self._pending is None or self._pending.done():
                self._pending = asyncio.run_coroutine_threadsafe(self._refresh(), self._loop)
            pending = self._pending
        try:
            pending.result(timeout=self.wait_s)
        except concurrent.futures.TimeoutError:
            pass  # the pull goes on; this scrape gets the values already held
        except Exception as err:  # noqa: BLE001 - a failed pull keeps the old values
            self.errors += 1
            log.warning("pulling replica stats for /metrics failed: %r", err)

    async def _refresh(self) -> None:
        self.merge(await self._pull())

    def merge(self, pulled: dict[str, Any]) -> None:
        now = self._clock()
        self.errors += int(pulled.get("errors", 0))
        for stats in pulled.get("encoders", []):
            self.encoders[(stats["modality"], stats["replica"])] = (stats, now)
        self.encoders = {k: v for k, v in self.encoders.items() if now - v[1] <= self.expire_s}
        if pulled.get("store") is not None:
            self.store = pulled["store"]
            newest = pulled.get("fusion_version")
            if newest is not None and newest != self.store["model_version"]:
                self.stale_since = self.stale_since if self.stale_since is not None else now
            elif newest is not None:
                self.stale_since = None
        self.pulled_at = now

    def collect(self) -> Iterator[Metric]:
        self.refresh()
        now = self._clock()
        yield from self._encoder_families()
        yield from self._store_families(now)
        age = GaugeMetricFamily("fusionrec_replica_stats_age_seconds",
                                "Age of the replica stats (encoders, store) in this scrape.")
        age.add_metric([], 0.0 if self.pulled_at is None else now - self.pulled_at)
        errors = CounterMetricFamily("fusionrec_replica_stats_errors", "Replica stats calls that failed.")
        errors.add_metric([], self.errors)
        yield age
        yield errors

    def _encoder_families(self) -> Iterator[Metric]:
        labels = ["modality", "replica"]
        batch = HistogramMetricFamily("fusionrec_encoder_batch_size", "Inputs per encoder batch.", labels=labels)
        pending = GaugeMetricFamily("fusionrec_encoder_queue_depth",
                                    "Inputs waiting for or in an encoder batch.", labels=labels)
        replicas = GaugeMetricFamily("fusionrec_encoder_replicas", "Encoder replicas seen in the last "
                                     f"{self.expire_s:.0f} s.", labels=["modality"])
        seen: dict[str, int] = {}
        for (modality, replica), (s, _) in sorted(self.encoders.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(BATCH_BUCKETS, s["bucket_counts"]):
                cumulative += n
                buckets.append((str(float(bound)), cumulative))
            buckets.append(("+Inf", s["batches"]))
            batch.add_metric([modality, replica], buckets, s["inputs"])
            pending.add_metric([modality, replica], s["pending"])
            seen[modality] = seen.get(modality, 0) + 1
        for modality, n in seen.items():
            replicas.add_metric([modality], n)
        yield from (batch, pending, replicas)

    def _store_families(self, now: float) -> Iterator[Metric]:
        store = self.store
        if store is None:
            return
        gauges = [("fusionrec_store_items", "Items in the store.", store["items"]),
                  ("fusionrec_index_memory_bytes", "Bytes held by the in-memory search index (0: Milvus "
                   "searches).", store["index_bytes"]),
                  ("fusionrec_index_stale_seconds", "How long the stored fused vectors have lagged the newest "
                   "loaded fusion model (0: current; a re-index is due).",
                   0.0 if self.stale_since is None else now - self.stale_since)]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        yield from _progress_families(store.get("progress") or {})


def _progress_families(progress: dict[str, Any]) -> Iterator[Metric]:
    reindex = progress.get("reindex") or {}
    running = GaugeMetricFamily("fusionrec_reindex_in_progress", "1 while fused vectors are rebuilt "
                                "(kind: reindex, or swap_commit).", labels=["kind"])
    ratio = GaugeMetricFamily("fusionrec_reindex_progress_ratio", "Items done / items, of the current or last "
                              "re-index.", labels=["kind"])
    if reindex:
        running.add_metric([reindex["kind"]], float(reindex["running"]))
        ratio.add_metric([reindex["kind"]], reindex["done"] / reindex["total"] if reindex["total"] else 1.0)
    swap_running = GaugeMetricFamily("fusionrec_swap_in_progress", "1 while an encoder swap of this modality "
                                     "runs (shadow vectors being filled or switched to).", labels=["modality"])
    swap_ratio = GaugeMetricFamily("fusionrec_swap_progress_ratio", "Items re-encoded by the incoming encoder / "
                                   "items holding the modality.", labels=["modality"])
    swap_done = GaugeMetricFamily("fusionrec_swap_items_reencoded", "Items with a vector from the incoming "
                                  "encoder.", labels=["modality"])
    for modality, s in sorted((progress.get("swaps") or {}).items()):
        swap_running.add_metric([modality], 1.0)
        swap_ratio.add_metric([modality], s["done"] / s["items"] if s["items"] else 0.0)
        swap_done.add_metric([modality], s["done"])
    yield from (running, ratio, swap_running, swap_ratio, swap_done)
