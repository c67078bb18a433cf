"""Committing an encoder swap: every item's vectors of one modality replaced by its shadow vectors
(retrieval/shadow.py) and its fused vector recomputed, switched atomically like a re-index.

MilvusStore.commit_swap (1) checks that every item holding the modality has a shadow vector, (2) builds
a new items collection from the swapped vectors while readers keep the old one, (3) commits with one
property write, as ``reindex`` does, then (4) rewrites the modality-vectors rows from the shadow and
drops it. A crash during (4) leaves the shadow marked committed; the next open finishes (4).
On a server all of it runs under the rebuild lock every replica shares (server_lock.py).

It runs in the process that answers Recommend, and on Lite Milvus itself does too (its server is Python
threads there): (2) and (4) go in small batches, flushed as they fill, with pauses between them
(``paced``), so searches get the interpreter. One flush of every rewritten row at the end held it for
~0.2-0.8 s (a probe search beside a 3,000-item commit: 768 ms at worst; flushed as they fill: 38 ms;
with 200-item batches and half the time paused: 20 ms).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from fusionrec.core.errors import FailedPrecondition, InvalidArgument
from fusionrec.retrieval.base import StoredItem, StoreSchema
from fusionrec.retrieval.layout import F_CONTENT, F_ID, F_MODALITIES, MILVUS_MAX_TOPK
from fusionrec.retrieval.modality_vectors import PackedVectors, SplitVectors
from fusionrec.retrieval.reindex import ReindexFn
from fusionrec.retrieval.rows import ItemRows
from fusionrec.retrieval.schema_meta import validate_schema
from fusionrec.retrieval.shadow import ShadowVectors

logger = logging.getLogger(__name__)
#: The commit's own thread runs at this niceness (at least), and the process' GIL slices are this short
#: meanwhile: it parses and writes every item's vectors, and Recommend on the same replica (its event loop)
#: and in the other deployments must not queue behind it (`fusionrec bench swap`: the commit's few seconds
#: set the p99 of a whole swap).
COMMIT_NICENESS = 19  # the lowest priority: Ray starts every replica at 15 already
COMMIT_SWITCH_INTERVAL_S = 0.0005
#: Items per batch the commit reads, fuses and writes: each batch's messages (~1,800 floats an item) are built
#: and parsed, by pymilvus and on Lite by Milvus' own threads, in calls that hold the GIL throughout, so the
#: batch bounds how long Recommend on the same replica waits for the interpreter (the probe search above:
#: p99 20 ms with 1000-item batches, 10 ms with 200).
COMMIT_BATCH_ITEMS = 200
T = TypeVar("T")


def paced(batches: Iterable[T], busy_share: float) -> Iterator[T]:
    """``batches`` as they come, with a pause after each one so that producing and consuming them takes at
    most ``busy_share`` (0-1] of the wall time: the pause (a sleep, which releases the GIL) lasts
    ``busy * (1 - busy_share) / busy_share``, ``busy`` being the time since the previous pause ended."""
    if not 0 < busy_share <= 1:
        raise ValueError(f"busy_share must be in (0, 1], got {busy_share}")
    started = time.perf_counter()
    for batch in batches:
        yield batch  # the consumer works on it before asking for the next
        if busy_share < 1:
            time.sleep((time.perf_counter() - started) * (1 - busy_share) / busy_share)
        started = time.perf_counter()


def niced(fn: Callable[[], T], niceness: int, name: str = "niced") -> T:
    """``fn()`` in a thread of its own at ``niceness`` at least (Linux keeps niceness per thread: this one
    alone, and the threads and processes it starts); its result or its exception."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), niceness))
        except (OSError, AttributeError):  # not Linux/Unix: same priority
            pass
        try:
            out["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            out["error"] = err

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def preemptible(fn: Callable[[], T]) -> T:
    """``fn()`` in a thread of its own at ``COMMIT_NICENESS`` (``niced``), with short GIL slices until it
    returns; its result or its exception."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, COMMIT_SWITCH_INTERVAL_S))
    try:
        return niced(fn, COMMIT_NICENESS, "swap-commit")
    finally:
        sys.setswitchinterval(previous)


def check_swap_schema(current: StoreSchema, new_schema: StoreSchema, modality: str, shadow_version: str,
                      shadow_dim: int) -> None:
    """InvalidArgument unless ``new_schema`` changes only ``modality``'s encoder version (to the shadow's)
    and the fused space."""
    validate_schema(new_schema)
    if new_schema.modality_dims != current.modality_dims:
        raise InvalidArgument("an encoder swap keeps every modality and its dim; "
                              f"{current.modality_dims} -> {new_schema.modality_dims}")
    if int(shadow_dim) != current.modality_dims[modality]:
        raise InvalidArgument(f"the incoming {modality} encoder makes {shadow_dim}-d vectors, the store holds "
                              f"{current.modality_dims[modality]}-d ones: a swap to another dim is not supported")
    others = {m: v for m, v in new_schema.encoder_versions.items() if m != modality}
    if others != {m: v for m, v in current.encoder_versions.items() if m != modality}:
        raise InvalidArgument(f"an encoder swap of {modality} changes no other encoder's version")
    if new_schema.encoder_versions.get(modality) != shadow_version:
        raise InvalidArgument(f"the shadow vectors are {shadow_version!r}, not "
                              f"{new_schema.encoder_versions.get(modality)!r}")


def holding(vectors: PackedVectors | SplitVectors, content_field: bool, modality: str,
            batch_size: int = 1000) -> dict[str, str]:
    """Every item holding a ``modality`` vector: id -> its kept content's digest ("" when none). Reads ids,
    modalities and digests only, never a vector: a full scan of 10,000 items parsed every vector and
    stalled Recommend on the same replica (the GIL) for seconds (`fusionrec bench swap`)."""
    content = [F_CONTENT] if content_field else []
    out: dict[str, str] = {}
    if isinstance(vectors, SplitVectors):  # a row only where the item has the modality
        for batch in vectors.conn.iterate(vectors.by_modality[modality], batch_size, [F_ID, *content]):
            out.update((r[F_ID], r.get(F_CONTENT) or "") for r in batch)
        return out
    for batch in vectors.conn.iterate(vectors.name, batch_size, [F_ID, F_MODALITIES, *content]):
        out.update((r[F_ID], (r.get(F_CONTENT) or {}).get(modality, "")) for r in batch
                   if modality in (r.get(F_MODALITIES) or ()))
    return out


def swapped(batches: Iterable[list[StoredItem]], modality: str, shadow: ShadowVectors, version: str
            ) -> Iterator[list[StoredItem]]:
    """The stored items with ``modality``'s vector and encoder version taken from the shadow."""
    for batch in batches:
        vectors = shadow.fetch([it.item_id for it in batch if modality in it.modality_vectors])
        out = []
        for it in batch:
            if modality in it.modality_vectors:
                it = replace(it, modality_vectors={**it.modality_vectors, modality: vectors[it.item_id]},
                             encoder_versions={**it.encoder_versions, modality: version})
            out.append(it)
        yield out


def require_complete(held: Iterable[str], shadow: ShadowVectors) -> None:
    """FailedPrecondition naming the items (of ``held``: those holding the modality) the re-encoding has
    not reached yet."""
    have = shadow.ids()
    missing = sorted(i for i in held if i not in have)
    if missing:
        raise FailedPrecondition(
            f"{len(missing)} items hold {shadow.modality} vectors but no shadow vector yet (e.g. {missing[:5]}): "
            "finish re-encoding first (items whose content was not kept must be upserted again or deleted)")


def rewrite_modality_rows(vectors: PackedVectors | SplitVectors, rows: ItemRows,
                          batches: Iterable[list[StoredItem]], modality: str) -> int:
    """Write the modality-vectors rows of the (already swapped) items holding ``modality``."""
    n = 0
    for batch in batches:
        mine = [it for it in batch if modality in it.modality_vectors]
        if mine:
            vectors.write([rows.prepare(it)[1] for it in mine], rows.mvec_row_bytes)
            vectors.after_write(len(mine))  # flushed as it fills, between the commit's pauses
            n += len(mine)
    return n


class EncoderSwaps:
    """The encoder-swap side of MilvusStore (a mixin over its connection, rows, locks and rebuild)."""

    def shadow(self, modality: str) -> ShadowVectors:
        """Shadow vectors of ``modality`` from an incoming encoder (retrieval/shadow.py)."""
        if modality not in self.schema.modality_dims:
            raise InvalidArgument(f"no {modality!r} modality in this store ({sorted(self.schema.modality_dims)})")
        return ShadowVectors(self._conn, self.items_collection, modality)

    def begin_shadow(self, modality: str, version: str, dim: int) -> bool:
        """Start (or resume) ``modality``'s shadow (ShadowVectors.begin) under the write lock, which shadow
        writes and the commit take too; readers (Recommend) do not wait. True when resuming."""
        shadow = self.shadow(modality)
        with self._write_lock:
            return shadow.begin(version, dim)

    def shadow_ids(self, modality: str) -> tuple[dict[str, Any] | None, set[str]]:
        """(state, ids holding a shadow vector) of ``modality``'s swap, (None, empty) when none runs. Under
        the write lock: a snapshot no shadow write or commit lands in the middle of."""
        shadow = self.shadow(modality)
        with self._write_lock:
            state = shadow.state()
            return state, (shadow.ids() if state else set())

    def swap_holding(self, modality: str) -> dict[str, str]:
        """Items holding ``modality``: id -> kept content digest, "" when none (``holding``)."""
        return holding(self._vectors, self._rows.content_field, modality)

    def put_shadow(self, modality: str, vectors: dict[str, np.ndarray]) -> bool:
        """Write shadow vectors while ``modality``'s swap is filling; False (nothing written) once it has
        committed or when none runs. Under the write lock, so a write never lands in a dropped shadow
        (on a server, a replica committing the swap holds the rebuild lock: then False too)."""
        shadow = self.shadow(modality)
        with self._write_lock:
            if self._server is not None and self._server.lock.busy():
                return False
            state = shadow.state()
            if state is None or state["committed"]:
                return False
            try:
                shadow.put(vectors, state)
            except Exception:
                if self._server is None or shadow.state() is not None:
                    raise
                return False  # another replica's commit dropped it meanwhile
        return True

    def commit_swap(self, modality: str, new_schema: StoreSchema, fn: ReindexFn,
                    batch_size: int = COMMIT_BATCH_ITEMS, busy_share: float = 1.0) -> int:
        """Serve ``modality``'s shadow vectors: every item holding it gets its shadow vector and a fused
        vector from ``fn`` (the fusion model refitted for them), switched to atomically as ``reindex``
        does; then the modality-vectors rows are rewritten and the shadow dropped (retrieval/swap.py).

        ``busy_share``: the share of the wall time the commit works on its batches, pausing between them
        (``paced``) so that searches on the same process get the interpreter; writes wait on it throughout.

        Raises FailedPrecondition while an item holding ``modality`` lacks a shadow vector. Returns
        the number of items re-indexed.
        """
        shadow = self.shadow(modality)
        batch_size = max(1, min(int(batch_size), MILVUS_MAX_TOPK))
        with self._write_lock, self._rebuilding(f"swap {modality}"):
            state = shadow.state()
            if state is None:
                raise FailedPrecondition(f"no {modality} encoder swap in progress")
            check_swap_schema(self.schema, new_schema, modality, state["version"], state["dim"])

            def switch() -> int:  # the caller's locks cover this thread's work (it waits for it)
                items = self._server.target if self._server is not None else self._items
                live = {r[F_ID] for batch in self._conn.iterate(items, batch_size, [F_ID]) for r in batch}
                require_complete(live.intersection(self.swap_holding(modality)), shadow)  # not a crash's orphan
                batches = swapped(self.iter_items(batch_size), modality, shadow, state["version"])
                t0 = time.perf_counter()
                n = self._rebuild(new_schema, paced(batches, busy_share), fn)
                shadow.mark_committed()
                t1 = time.perf_counter()
                self._finish_swap(shadow, batch_size, busy_share)
                logger.info("swap %s committed: %d items re-indexed in %.1f s, modality rows rewritten in %.1f s",
                            modality, n, t1 - t0, time.perf_counter() - t1)
                return n

            return preemptible(switch)

    def _finish_swap(self, shadow: ShadowVectors, batch_size: int = COMMIT_BATCH_ITEMS, busy_share: float = 1.0
                     ) -> None:
        """After the commit: the modality-vectors rows take the shadow vectors, then the shadow goes."""
        version = self.schema.encoder_versions[shadow.modality]
        batches = swapped(self.iter_items(batch_size), shadow.modality, shadow, version)
        rewrite_modality_rows(self._vectors, self._rows, paced(batches, busy_share), shadow.modality)
        if self._server is None:
            self._conn.client.flush(self.mvec_collection)
        shadow.drop()

    def _resume_swaps(self) -> None:
        """Finish a swap that committed before a crash (its shadow is marked committed)."""
        for modality in self.schema.modality_dims:
            shadow = ShadowVectors(self._conn, self.items_collection, modality)
            state = shadow.state()
            if not (state and state["committed"] and state["version"] == self.schema.encoder_versions.get(modality)):
                continue
            with self._write_lock, self._rebuilding(f"finish swap {modality}"):
                if shadow.state() is not None:  # on a server another replica may have finished it
                    logger.warning("finishing the committed %s encoder swap to %s", modality, state["version"])
                    self._finish_swap(shadow)
