"""ItemMirror: an in-memory copy of the items collection (ids, fused vectors, attributes) for search.

Milvus stays the system of record; MilvusStore fills the mirror from the items collection
when it opens and applies every upsert/delete to it after Milvus accepted the write.
Searches read it under a shared lock, writes take it exclusively.
"""

from __future__ import annotations

import threading
from typing import Iterable

import numpy as np

from fusionrec.retrieval.ann import VectorIndex
from fusionrec.retrieval.attributes import AttributeTable
from fusionrec.retrieval.base import AttributeValue, Candidate, FilterSpec, Hits

DEFAULT_COMPACT_DEAD_FRACTION = 0.3  # rebuild the index once this share of slots is dead
COMPACT_MIN_DEAD = 1_000


class _RWLock:
    """Many readers or one writer; writers wait for readers to drain (write-preferring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class ItemMirror:
    """Fused vectors + attributes of every stored item, searchable in memory. Thread-safe.

    Args:
        dim: fused vector length.
        compact_dead_fraction: rebuild the vector index when this share of its slots holds
            replaced or deleted vectors (and at least 1,000 do).
        **index_params: passed to VectorIndex (m, ef_construction, ef_search, ef_max,
            exact_max_rows).
    """

    def __init__(self, dim: int, *, compact_dead_fraction: float = DEFAULT_COMPACT_DEAD_FRACTION,
                 **index_params) -> None:
        self.dim = int(dim)
        self._compact_at = float(compact_dead_fraction)
        self._lock = _RWLock()
        self._index = VectorIndex(self.dim, **index_params)
        self._attrs = AttributeTable()
        self._slot_of: dict[str, int] = {}
        self._id_of: list[str | None] = []

    def __len__(self) -> int:
        return len(self._slot_of)

    # ------------------------------------------------------------------ writes

    def upsert(self, ids: list[str], fused: np.ndarray, attributes: list[dict[str, AttributeValue]]) -> None:
        """Insert or replace items (ids unique). fused: (n, dim) float32."""
        fused = np.asarray(fused, dtype=np.float32).reshape(len(ids), self.dim)
        self._lock.acquire_write()
        try:
            new_rows: list[int] = []
            old_slots = [self._slot_of.get(i) for i in ids]
            known = [j for j, s in enumerate(old_slots) if s is not None]
            if known:
                same = np.all(
                    self._index.vectors(np.array([old_slots[j] for j in known])) == fused[known], axis=1
                )
                for j, unchanged in zip(known, same):
                    if unchanged:  # attribute-only change: keep the slot
                        self._attrs.set(old_slots[j], attributes[j])
                    else:
                        self._drop_slot(old_slots[j])
                        new_rows.append(j)
            new_rows.extend(j for j, s in enumerate(old_slots) if s is None)
            new_rows.sort()
            if new_rows:
                slots = self._index.add(fused[new_rows])
                for j, slot in zip(new_rows, slots.tolist()):
                    self._attrs.set(slot, attributes[j])
                    self._id_of.append(ids[j])
                    self._slot_of[ids[j]] = slot
            self._maybe_compact()
        finally:
            self._lock.release_write()

    def delete(self, ids: Iterable[str]) -> None:
        self._lock.acquire_write()
        try:
            for i in ids:
                slot = self._slot_of.pop(i, None)
                if slot is not None:
                    self._drop_slot(slot)
            self._maybe_compact()
        finally:
            self._lock.release_write()

    def _drop_slot(self, slot: int) -> None:
        self._index.remove(np.array([slot]))
        self._attrs.clear(slot)
        self._id_of[slot] = None

    def _maybe_compact(self) -> None:
        dead = self._index.n_dead
        if dead >= COMPACT_MIN_DEAD and dead >= self._compact_at * self._index.n_slots:
            self._compact()

    def _compact(self) -> None:
        """Caller holds the write lock. Rebuilds the HNSW graph over the live vectors."""
        index, old = self._index.compacted()
        attrs = AttributeTable()
        id_of: list[str | None] = []
        for new_slot, old_slot in enumerate(old.tolist()):
            attrs.set(new_slot, self._attrs.row(old_slot))
            id_of.append(self._id_of[old_slot])
        self._index, self._attrs, self._id_of = index, attrs, id_of
        self._slot_of = {i: s for s, i in enumerate(id_of)}

    # ------------------------------------------------------------------ reads

    def fused(self, ids: list[str]) -> dict[str, np.ndarray]:
        """Fused vectors of the known ids among ``ids``: id -> (dim,) float32."""
        self._lock.acquire_read()
        try:
            known = [i for i in dict.fromkeys(ids) if i in self._slot_of]
            if not known:
                return {}
            vecs = self._index.vectors(np.array([self._slot_of[i] for i in known]))
            return dict(zip(known, vecs))
        finally:
            self._lock.release_read()

    def memory_bytes(self) -> int:
        ids = sum(len(i) + 120 for i in self._slot_of)  # str objects + dict/list entries, roughly
        return self._index.memory_bytes() + self._attrs.memory_bytes() + ids

    def search(
        self,
        query: np.ndarray,
        k: int,
        filters: list[FilterSpec] | None = None,
        exclude_ids: set[str] | None = None,
        only_ids: set[str] | None = None,
    ) -> list[Candidate]:
        """Top-k by inner product, same contract as ItemStore.search (inputs already checked)."""
        return self.search_hits(query, k, filters, exclude_ids, only_ids).candidates()

    def search_hits(self, query: np.ndarray, k: int, filters: list[FilterSpec] | None = None,
                    exclude_ids: set[str] | None = None, only_ids: set[str] | None = None) -> Hits:
        """``search`` as arrays: ids, scores (k,), fused vectors (k, dim), attributes."""
        self._lock.acquire_read()
        try:
            n = self._index.n_slots
            mask = self._attrs.mask(filters) if filters else None
            if only_ids is not None:
                only = np.zeros(n, dtype=bool)
                only[[self._slot_of[i] for i in only_ids if i in self._slot_of]] = True
                mask = only if mask is None else mask & only
            excluded = [self._slot_of[i] for i in exclude_ids or () if i in self._slot_of]
            if excluded:
                if mask is None:
                    mask = np.ones(n, dtype=bool)
                mask[excluded] = False
            slots, scores = self._index.search(query, k, mask)
            picked = slots.tolist()
            return Hits([self._id_of[s] for s in picked], scores, self._index.vectors(slots),
                        [self._attrs.row(s) for s in picked])
        finally:
            self._lock.release_read()
