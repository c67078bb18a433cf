"""VectorIndex: in-memory inner-product top-k over slot-numbered vectors (faiss HNSW or IVF, exact re-scoring).

Plain numpy/faiss, no Milvus. Slots are dense int64 labels handed out by ``add``; ``remove``
tombstones a slot (neither graph nor lists drop rows); ``compacted`` builds a fresh index over
the live slots. The full float32 vectors are always kept (exact search, re-scoring, ``vectors``).

Below ``reduce_at`` rows an HNSW graph runs over the full vectors, as they are. From
``reduce_at`` rows on (when ``dim >= 2 * reduced_dim``) an IVF index (k-means lists, faiss
IndexIVFFlat) runs over a projection on the top ``reduced_dim`` eigenvectors of the vectors'
second-moment matrix (uncentred, so inner products are what it approximates), and the
``rerank`` x k best candidates (fewer for large k) are re-scored exactly on the full vectors, so returned
scores are exact. Projection and lists are fitted on the rows present (``compacted`` refits), and
refitted whenever the index has grown ``REFIT_GROWTH`` times since: the fit costs seconds
where an HNSW graph over 1M rows took minutes (bench/retrieval.py, 768-d).

``search`` takes an optional boolean mask over slots (filters, exclusions):

- no mask: HNSW (efSearch ``ef_search``) or IVF (``nprobe`` lists);
- mask allowing <= ``exact_max_rows`` rows: exact scan of the full vectors over just those rows;
- larger masks: HNSW / IVF restricted to the mask (faiss IDSelectorBitmap), efSearch scaled by
  2/selectivity (capped at ``ef_max``), nprobe by sqrt(1/selectivity), then exact if fewer than
  k hits.
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
DEFAULT_REDUCED_DIM = 128
DEFAULT_REDUCE_AT = 20_000
DEFAULT_RERANK = 4
RERANK_EXTRA_MAX = 200  # re-scored rows beyond k, at most (or k itself when larger): see _projected_search
DEFAULT_NPROBE = 32
BRUTE_FORCE_BELOW = 2_048  # whole index smaller than this: always exact
FIT_SAMPLE_ROWS = 100_000  # rows the projection is fitted on (evenly strided)
MAX_LISTS = 1_024  # k-means lists: sqrt(rows), at most this (training cost grows with lists x sample)
TRAIN_ROWS_PER_LIST = 64
REFIT_GROWTH = 4  # refit projection and lists once the index holds this many times the rows fitted on
_ADD_CHUNK_ROWS = 100_000  # projected in chunks: no full (n, reduced_dim) temporary at 1M rows


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.float32)


def _selector_params(mask: np.ndarray, cls=faiss.SearchParameters, **kw) -> tuple[np.ndarray, object]:
    """(bits, params): the bitmap must outlive the search that reads it."""
    bits = np.packbits(mask, bitorder="little")
    sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
    return bits, cls(sel=sel, **kw)


def fit_projection(sample: np.ndarray, reduced_dim: int) -> np.ndarray:
    """(dim, reduced_dim) float32: the top eigenvectors of sample's uncentred second moment."""
    s = np.asarray(sample, dtype=np.float32)
    _, vecs = np.linalg.eigh((s.T @ s).astype(np.float64) / max(1, len(s)))  # ascending eigenvalues
    return np.ascontiguousarray(vecs[:, ::-1][:, :reduced_dim], dtype=np.float32)


class VectorIndex:
    """Top-k by inner product over float32 vectors of one dim; not thread-safe by itself.

    Args:
        dim: vector length.
        m: HNSW neighbours per node (faiss ``M``).
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width for unfiltered search (raised to k when smaller).
        ef_max: cap of the beam width for masked HNSW search.
        exact_max_rows: masks allowing at most this many rows are searched exactly.
        reduced_dim: dimensions of the projection the lists run over (0: never project).
        reduce_at: rows from which IVF lists over the projection replace the HNSW graph.
        rerank: candidates per wanted result re-scored exactly on the projected lists.
        nprobe: lists scanned per unmasked query.
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
        reduced_dim: int = DEFAULT_REDUCED_DIM,
        reduce_at: int = DEFAULT_REDUCE_AT,
        rerank: int = DEFAULT_RERANK,
        nprobe: int = DEFAULT_NPROBE,
    ) -> None:
        self.dim = int(dim)
        self.params = dict(m=m, ef_construction=ef_construction, ef_search=ef_search, ef_max=ef_max,
                           exact_max_rows=exact_max_rows, reduced_dim=reduced_dim, reduce_at=reduce_at,
                           rerank=rerank, nprobe=nprobe)
        self.ef_search = int(ef_search)
        self.ef_max = int(ef_max)
        self.exact_max_rows = int(exact_max_rows)
        self.reduced_dim = int(reduced_dim)
        self.reduce_at = int(reduce_at)
        self.rerank = max(1, int(rerank))
        self.nprobe = max(1, int(nprobe))
        self._flat = faiss.IndexFlatIP(self.dim)  # the full vectors
        self._graph = faiss.IndexHNSW(self._flat, int(m))  # over the full vectors until projected
        self._graph.hnsw.efConstruction = int(ef_construction)
        self._projection: np.ndarray | None = None  # (dim, reduced_dim) once projected
        self._fitted_rows = 0
        self._quantizer = None
        self._xb = np.zeros((0, self.dim), dtype=np.float32)  # view on faiss' storage
        self._live = np.zeros(0, dtype=bool)
        self._n_live = 0

    # ------------------------------------------------------------------ contents

    @property
    def n_slots(self) -> int:
        return int(self._flat.ntotal)

    @property
    def n_live(self) -> int:
        return self._n_live

    @property
    def n_dead(self) -> int:
        return self.n_slots - self._n_live

    @property
    def projected(self) -> bool:
        """Whether IVF lists over the reduced projection serve searches (and results are re-scored)."""
        return self._projection is not None

    def live_mask(self) -> np.ndarray:
        """(n_slots,) bool, a read-only view."""
        v = self._live[: self.n_slots]
        v.flags.writeable = False
        return v

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        """(len(slots), dim) float32 copies of the stored vectors."""
        return self._xb[np.asarray(slots, dtype=np.int64)]  # fancy indexing copies

    def add(self, vectors: np.ndarray) -> np.ndarray:
        """Append (n, dim) vectors; returns their slots (int64, consecutive)."""
        x = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        start = self.n_slots
        if not len(x):
            return np.arange(start, start, dtype=np.int64)
        grown = start + len(x)
        if self._projection is None:
            fit = 0 < 2 * self.reduced_dim <= self.dim and grown >= self.reduce_at
        else:
            fit = grown >= REFIT_GROWTH * self._fitted_rows
        if self._projection is not None or fit:
            self._flat.add(x)  # the graph or lists are rebuilt by _fit below, or take x projected
        else:
            self._graph.add(x)  # adds to self._flat too (its storage)
        n = self.n_slots
        self._xb = faiss.rev_swig_ptr(self._flat.get_xb(), n * self.dim).reshape(n, self.dim)
        if fit:
            self._fit()
        elif self._projection is not None:
            self._add_projected(x)
        if len(self._live) < n:
            grown = np.zeros(max(n, 2 * len(self._live), 1024), dtype=bool)
            grown[: len(self._live)] = self._live
            self._live = grown
        self._live[start:n] = True
        self._n_live += len(x)
        return np.arange(start, n, dtype=np.int64)

    def _fit(self) -> None:
        """Fit projection and k-means lists on the rows present; put every row in the lists."""
        n = self.n_slots
        self._projection = fit_projection(self._xb[:: max(1, n // FIT_SAMPLE_ROWS)], self.reduced_dim)
        n_lists = int(min(MAX_LISTS, max(16, round(math.sqrt(n)))))
        quantizer = faiss.IndexFlatIP(self.reduced_dim)
        lists = faiss.IndexIVFFlat(quantizer, self.reduced_dim, n_lists, faiss.METRIC_INNER_PRODUCT)
        step = max(1, n // (TRAIN_ROWS_PER_LIST * n_lists))
        lists.train(np.ascontiguousarray(self._xb[::step] @ self._projection))
        self._graph, self._quantizer = lists, quantizer  # the lists do not own their quantizer
        self._fitted_rows = n
        self._add_projected(self._xb)

    def _add_projected(self, x: np.ndarray) -> None:
        for s in range(0, len(x), _ADD_CHUNK_ROWS):
            self._graph.add(np.ascontiguousarray(x[s: s + _ADD_CHUNK_ROWS] @ self._projection))

    def remove(self, slots: np.ndarray) -> None:
        """Tombstone slots (ignores ones already removed)."""
        s = np.asarray(slots, dtype=np.int64)
        s = s[self._live[s]]
        self._live[s] = False
        self._n_live -= len(np.unique(s))

    def memory_bytes(self) -> int:
        """Vectors (full and projected) + graph or lists + masks, approximately."""
        n = self.n_slots
        if self._projection is not None:  # projected rows + their ids in the lists
            extra = n * (self.reduced_dim * 4 + 8) + self._graph.nlist * self.reduced_dim * 4
        else:
            extra = faiss.vector_to_array(self._graph.hnsw.neighbors).nbytes + n * 17 if n else 0
        return n * self.dim * 4 + extra + self._live.nbytes

    def compacted(self) -> tuple["VectorIndex", np.ndarray]:
        """A fresh index over the live slots (projection refitted), and the old slot of each new slot."""
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
        Returns (slots int64, scores float32), at most k of each; scores are exact inner products.
        """
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        n = self.n_slots
        if k <= 0 or n == 0:
            return _empty()
        mask = None
        if allowed is not None:
            mask = np.asarray(allowed, dtype=bool)[:n] & self._live[:n]
        elif self._n_live < n:
            mask = self._live[:n]
        n_allowed = n if mask is None else int(np.count_nonzero(mask))
        if n_allowed == 0:
            return _empty()
        if n < BRUTE_FORCE_BELOW or (mask is not None and n_allowed <= self.exact_max_rows):
            return self._scan(self._flat, q, k, mask)
        want = min(k, n_allowed)
        if self._projection is None:
            slots, scores = self._hnsw(q, k, mask, n_allowed / n)
        else:
            slots, scores = self._projected_search(q, k, mask, n_allowed)
        if len(slots) < want:
            return self._scan(self._flat, q, k, mask)
        return slots, scores

    def _projected_search(self, q: np.ndarray, k: int, mask: np.ndarray | None,
                          n_allowed: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the projected lists, re-scored exactly on the full vectors."""
        qp = np.ascontiguousarray(q @ self._projection)
        # Past a few hundred, more re-scored rows buy nothing: top-200 recall over 100k clustered 768-d vectors
        # was 0.907 re-scoring 800 or 400 (nprobe bounds it), and the 800 cost the ranking stage 0.3 ms.
        wanted = min(k * self.rerank, max(2 * k, k + RERANK_EXTRA_MAX))
        nlist = self._graph.nlist
        if mask is None:
            dist, lab = self._graph.search(qp, wanted, params=faiss.SearchParametersIVF(nprobe=min(self.nprobe, nlist)))
        else:
            # A masked list scan costs about what an unmasked one does (every id is checked), so nprobe grows
            # with sqrt(1/selectivity), not 1/selectivity: recall@100 0.99 at a 5 % filter over 1M rows, 632
            # lists (all 632: p50 27 ms; 143: 10 ms, under load), bench/retrieval.py.
            nprobe = min(nlist, int(math.ceil(self.nprobe * math.sqrt(self.n_slots / n_allowed))))
            bits, params = _selector_params(mask, faiss.SearchParametersIVF, nprobe=nprobe)
            dist, lab = self._graph.search(qp, wanted, params=params)
            del bits
        cand = lab[0][lab[0] >= 0]
        scores = self._xb[cand] @ q[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return cand[order].astype(np.int64), scores[order].astype(np.float32)

    def _scan(self, flat, q: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        # faiss' flat scan over its own storage: no gather copy, GIL released, and no BLAS
        # (numpy's multi-threaded gemv from 8 caller threads on 2 cores ran 10x slower).
        storage = faiss.downcast_index(flat)
        k = min(k, self.n_slots if mask is None else int(np.count_nonzero(mask)))
        if mask is None:
            dist, lab = storage.search(q, k)
        else:
            bits, params = _selector_params(mask)
            dist, lab = storage.search(q, k, params=params)
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
            bits, params = _selector_params(mask, faiss.SearchParametersHNSW, efSearch=ef)
        dist, lab = self._graph.search(q, k, params=params)
        del bits  # the selector reads it during search only
        ok = lab[0] >= 0
        return lab[0][ok].astype(np.int64), dist[0][ok].astype(np.float32)
