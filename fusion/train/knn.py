"""Each row's k nearest other rows by inner product, in O(n·k) memory: faiss exact search, IVF when large."""

from __future__ import annotations

import numpy as np

#: Up to this many rows the search is exact (faiss blocks the queries: O(n·k) memory, O(n^2·d) time, ~1.5 s
#: at 20k x 384-d). Above it an inverted file answers: k-means into ~4·sqrt(n) lists, each row searched in the
#: ``IVF_PROBES`` nearest lists. Measured at 100k x 384-d clustered vectors, one thread: ~11 s with recall@10
#: 0.99 against exact (HNSW M 32: ~26 s, recall 0.97; exact: ~70 s).
EXACT_MAX_ROWS = 20_000
IVF_LISTS_PER_SQRT_N = 4
IVF_PROBES = 12
IVF_TRAIN_ROWS_PER_LIST = 40
IVF_KMEANS_ITERATIONS = 10


def nearest(x: np.ndarray, k: int, exact: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of ``x`` with the largest inner product to each row, the row itself excluded.

    Args:
        x: (n, d) float32 rows (unit rows: cosine).
        k: neighbours per row; capped at n - 1.
        exact: force exact (True) or IVF (False) search; default exact up to ``EXACT_MAX_ROWS`` rows.
    Returns:
        (n, k') int64 neighbour rows, best first (-1 where the search found fewer), and (n, k') float32
        inner products (-inf where -1); k' = min(k, n - 1).
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = min(int(k), n - 1)
    if k <= 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    if not (exact if exact is not None else n <= EXACT_MAX_ROWS):
        index = _ivf(x, index)
    index.add(x)
    sims, ids = index.search(x, k + 1)
    return _drop_self(ids.astype(np.int64), sims, k)


def _ivf(x: np.ndarray, quantizer: object) -> object:
    """An inverted-file index over ``x``'s space, trained on a fixed sample of its rows (deterministic)."""
    import faiss

    n = len(x)
    lists = max(1, min(n // IVF_TRAIN_ROWS_PER_LIST, int(IVF_LISTS_PER_SQRT_N * np.sqrt(n))))
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = IVF_KMEANS_ITERATIONS
    index.cp.seed = 0
    sample = np.random.default_rng(0).choice(n, size=min(n, IVF_TRAIN_ROWS_PER_LIST * lists), replace=False)
    index.train(x[np.sort(sample)])
    index.nprobe = min(lists, IVF_PROBES)
    return index


def _drop_self(ids: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k+1) results of searching every row against itself -> (n, k) without the row itself (or, when a
    duplicate pushed it out of the list, without the last hit)."""
    n = len(ids)
    drop = ids == np.arange(n)[:, None]
    drop[~drop.any(1), -1] = True
    keep = ~drop
    ids, sims = ids[keep].reshape(n, k), sims[keep].reshape(n, k).astype(np.float32)
    sims[ids < 0] = -np.inf
    return ids, sims
