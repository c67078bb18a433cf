"""VectorIndex: in-memory inner-product top-k over slot-numbered vectors (faiss HNSW + exact numpy).

Plain numpy/faiss, no Milvus. Slots are dense int64 labels handed out by ``add``; ``remove``
tombstones a slot (HNSW graphs cannot drop nodes); ``compacted`` builds a fresh index over
the live slots. ``search`` takes an optional boolean mask over slots (filters, exclusions)
and picks the cheaper exact strategy for small masks:

- no mask: HNSW (efSearch ``ef_search``, at least k);
- mask allowing <= ``exact_max_rows`` rows: exact numpy inner product over just those rows;
- larger masks: HNSW restricted to the mask (faiss IDSelectorBitmap) with efSearch scaled
  by 2/selectivity (capped at ``ef_max``), then exact if it found fewer than k hits.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

DEFAULT_M = 32
DEFAULT_EF_CONSTRUCTION = 40
DEFAULT_EF_SEARCH = 128
DEFAULT_EF_MAX = 2048
DEFAULT_EXACT_MAX_ROWS = 10_000
BRUTE_FORCE_BELOW = 2_048  # whole index smaller than this: always exact


class VectorIndex:
    """Top-k by inner product over float32 vectors of one dim; not thread-safe by itself.

    Args:
        dim: vector length.
        m: HNSW neighbours per node (faiss ``M``).
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width for unfiltered search (raised to k when smaller).
        ef_max: cap of the beam width for masked HNSW search.
        exact_max_rows: masks allowing at most this many rows are searched exactly.
    """

    def __init__(
        self,
        dim: int,
        *,
        m: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
        ef_max: int = DEFAULT_EF_MAX,
        exact_max_rows: int = DEFAULT_EXACT_MAX_ROWS,
    ) -> None:
        self.dim = int(dim)
        self.params = dict(m=m, ef_construction=ef_construction, ef_search=ef_search,
                           ef_max=ef_max, exact_max_rows=exact_max_rows)
        self.ef_search = int(ef_search)
        self.ef_max = int(ef_max)
        self.exact_max_rows = int(exact_max_rows)
        self._index = faiss.IndexHNSWFlat(self.dim, int(m), faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = int(ef_construction)
        self._xb = np.zeros((0, self.dim), dtype=np.float32)  # view on faiss' storage
        self._live = np.zeros(0, dtype=bool)
        self._n_live = 0

    # ------------------------------------------------------------------ contents

    @property
    def n_slots(self) -> int:
        return int(self._index.ntotal)

    @property
    def n_live(self) -> int:
        return self._n_live

    @property
    def n_dead(self) -> int:
        return self.n_slots - self._n_live

    def live_mask(self) -> np.ndarray:
        """(n_slots,) bool, a read-only view."""
        v = self._live[: self.n_slots]
        v.flags.writeable = False
        return v

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        """(len(slots), dim) float32 copies of the stored vectors."""
        return self._xb[np.asarray(slots, dtype=np.int64)].copy()

    def add(self, vectors: np.ndarray) -> np.ndarray:
        """Append (n, dim) vectors; returns their slots (int64, consecutive)."""
        x = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        start = self.n_slots
        if len(x):
            self._index.add(x)
            n = self.n_slots
            storage = faiss.downcast_index(self._index.storage)
            self._xb = faiss.rev_swig_ptr(storage.get_xb(), n * self.dim).reshape(n, self.dim)
            if len(self._live) < n:
                grown = np.zeros(max(n, 2 * len(self._live), 1024), dtype=bool)
                grown[: len(self._live)] = self._live
                self._live = grown
            self._live[start:n] = True
            self._n_live += len(x)
        return np.arange(start, start + len(x), dtype=np.int64)

    def remove(self, slots: np.ndarray) -> None:
        """Tombstone slots (ignores ones already removed)."""
        s = np.asarray(slots, dtype=np.int64)
        s = s[self._live[s]]
        self._live[s] = False
        self._n_live -= len(np.unique(s))

    def memory_bytes(self) -> int:
        """Vectors + graph + masks, approximately."""
        n = self.n_slots
        links = faiss.vector_to_array(self._index.hnsw.neighbors).nbytes if n else 0
        return n * self.dim * 4 + links + n * 17 + self._live.nbytes

    def compacted(self) -> tuple["VectorIndex", np.ndarray]:
        """A fresh index over the live slots, and the old slot of each new slot."""
        old = np.flatnonzero(self.live_mask())
        fresh = VectorIndex(self.dim, **self.params)
        fresh.add(self._xb[old])
        return fresh, old

    # ------------------------------------------------------------------ search

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k live slots by inner product with ``query`` ((dim,) float32), best first.

        allowed: optional (n_slots,) bool mask; only those slots may be returned.
        Returns (slots int64, scores float32), at most k of each.
        """
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        n = self.n_slots
        if k <= 0 or n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        mask = None
        if allowed is not None:
            mask = np.asarray(allowed, dtype=bool)[:n] & self._live[:n]
        elif self._n_live < n:
            mask = self._live[:n]
        n_allowed = n if mask is None else int(np.count_nonzero(mask))
        if n_allowed == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if n < BRUTE_FORCE_BELOW or (mask is not None and n_allowed <= self.exact_max_rows):
            return self._exact(q[0], k, mask)
        want = min(k, n_allowed)
        slots, scores = self._hnsw(q, k, mask, n_allowed / n)
        if len(slots) < want:
            return self._exact(q[0], k, mask)
        return slots, scores

    def _exact(self, q: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        # faiss' flat scan over its own storage: no gather copy, GIL released, and no BLAS
        # (numpy's multi-threaded gemv from 8 caller threads on 2 cores ran 10x slower).
        storage = faiss.downcast_index(self._index.storage)
        k = min(k, self.n_slots if mask is None else int(np.count_nonzero(mask)))
        if mask is None:
            dist, lab = storage.search(q.reshape(1, -1), k)
        else:
            bits = np.packbits(mask, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
            dist, lab = storage.search(q.reshape(1, -1), k, params=faiss.SearchParameters(sel=sel))
            del bits
        ok = lab[0] >= 0
        return lab[0][ok].astype(np.int64), dist[0][ok].astype(np.float32)

    def _hnsw(
        self, q: np.ndarray, k: int, mask: np.ndarray | None, selectivity: float
    ) -> tuple[np.ndarray, np.ndarray]:
        ef = max(self.ef_search, k)
        if mask is None:
            params = faiss.SearchParametersHNSW(efSearch=ef)
            bits = None
        else:
            ef = min(max(self.ef_max, k), int(math.ceil(2 * ef / max(selectivity, 1e-9))))
            bits = np.packbits(mask, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
        dist, lab = self._index.search(q, k, params=params)
        del bits  # the selector reads it during search only
        ok = lab[0] >= 0
        return lab[0][ok].astype(np.int64), dist[0][ok].astype(np.float32)
