"""Sparse graphs for the graph variants: item-item (co-occurrence + content kNN top-k) and user-item (LightGCN).

Every graph is built and kept in O(n·k) memory: each item's top-k neighbours (co-occurrence counted a block
of items at a time with scipy.sparse, content neighbours by faiss kNN), symmetrised, normalised, and handed
to the nets as a torch sparse CSR tensor that ``torch.sparse.mm`` propagates over; nothing is densified.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from fusionrec.fusion.train.knn import nearest

#: Co-occurrence is counted for a block of items at a time; a block's product holds about this many entries
#: at most (plus one catalog row), so memory stays bounded however long users' histories are.
COOC_BLOCK_ENTRIES = 1 << 23

Triples = tuple[np.ndarray, np.ndarray, np.ndarray]


def to_torch(graph: sp.spmatrix) -> torch.Tensor:
    """A scipy (n, n) matrix as a torch sparse CSR float32 tensor (what the nets propagate with)."""
    m = sp.csr_matrix(graph, dtype=np.float32)
    m.sum_duplicates()
    m.sort_indices()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                       torch.from_numpy(m.indices.astype(np.int64)),
                                       torch.from_numpy(m.data), m.shape, check_invariants=True)


def sym_norm(graph: sp.spmatrix) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 (D = row sums; isolated nodes keep zero rows)."""
    m = sp.csr_matrix(graph, dtype=np.float64)
    deg = np.asarray(m.sum(1)).ravel()
    inv = sp.diags(np.where(deg > 0, deg, 1.0) ** -0.5)
    return (inv @ m @ inv).tocsr()


def symmetric_max(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int) -> sp.csr_matrix:
    """Directed positive edges -> symmetric (n, n) matrix keeping the larger weight of both directions,
    so the normalised operator is symmetric."""
    a = sp.csr_matrix((vals.astype(np.float64), (rows, cols)), shape=(n, n))
    return a.maximum(a.T).tocsr()


def row_topk(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, k: int) -> Triples:
    """Each row's k largest positive entries among COO triples (no duplicates); ties in a fixed order."""
    ok = vals > 0
    rows, cols, vals = rows[ok], cols[ok], vals[ok]
    long = np.bincount(rows, minlength=int(rows.max(initial=-1)) + 1)[rows] > k
    order = np.flatnonzero(long)
    if len(order):  # rows with more than k entries, best first: one float sort on row + (1 - value / max) / 2
        first_row = rows[order].min()
        key = (rows[order] - first_row) + 0.5 * (1.0 - vals[order] / vals[order].max())
        order = order[np.argsort(key)]
    r = rows[order]
    first = np.r_[0, np.flatnonzero(np.diff(r)) + 1]
    rank = np.arange(len(r)) - np.repeat(first, np.diff(np.r_[first, len(r)]))
    keep = np.concatenate([np.flatnonzero(~long), order[rank < k]])
    return rows[keep], cols[keep], vals[keep]


def cooccurrence_topk(train: np.ndarray, n_users: int, n_items: int, k: int = 20,
                      block_entries: int = COOC_BLOCK_ENTRIES) -> Triples:
    """Each item's k most co-consumed other items (cosine of binary train columns), as directed triples.

    Counted a block of items at a time (``R[:, block].T @ R``), blocks sized so their product stays near
    ``block_entries`` entries: time ~ the co-occurring pairs, memory ~ one block, never n_items^2.

    Returns:
        rows, cols (int64) and cosines (float64), at most k per row, self excluded.
    """
    r = sp.csr_matrix((np.ones(len(train), np.float32), (train[:, 0], train[:, 1])), shape=(n_users, n_items))
    r.data[:] = 1.0  # duplicates were summed: binarise
    norms = np.sqrt(np.asarray(r.sum(0)).ravel()).clip(min=1.0)
    rt = r.T.tocsr()
    bound = np.minimum(rt @ np.diff(r.indptr).astype(np.float64), n_items)  # entries an item's row can have
    block = ((np.cumsum(bound) - bound) // block_entries).astype(np.int64)
    cuts = np.r_[0, np.flatnonzero(np.diff(block)) + 1, n_items]
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        c = (rt[a:b] @ r).tocoo()
        rows, cols = c.row.astype(np.int64) + a, c.col.astype(np.int64)
        vals = c.data.astype(np.float64) / norms[rows] / norms[cols]
        off = rows != cols
        parts.append(row_topk(rows[off], cols[off], vals[off], k))
    rows, cols, vals = (np.concatenate([p[j] for p in parts]) for j in range(3))
    return rows, cols, vals


def cooccurrence_graph(train: np.ndarray, n_users: int, n_items: int, k: int = 20) -> sp.csr_matrix:
    """Items co-consumed by the same users, top-k per item, symmetrised, sym-normalised: (n_items, n_items)."""
    return sym_norm(symmetric_max(*cooccurrence_topk(train, n_users, n_items, k), n_items))


def content_topk(features: np.ndarray, k: int = 10, keep: np.ndarray | None = None,
                 centre: np.ndarray | None = None, exact: bool | None = None) -> Triples:
    """Each item's k most similar items by content (cosine of centred (n, d) features), as directed triples.

    Args:
        keep: (n,) bool; items outside it get no edges (cold items stay content-only, as served).
        centre: (n,) bool rows whose mean centres the features (default all; held-out items excluded).
        exact: faiss exact or HNSW search (default: by size, fusionrec.fusion.train.knn).
    """
    x = features - features[centre if centre is not None else slice(None)].mean(0, keepdims=True)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)
    rows = np.arange(len(x)) if keep is None else np.flatnonzero(keep)
    ids, sims = nearest(x[rows], k, exact)
    r, c, v = np.repeat(rows, ids.shape[1]), rows[ids.clip(min=0)].ravel(), sims.ravel().astype(np.float64)
    ok = (ids.ravel() >= 0) & np.isfinite(v) & (v > 0)
    return r[ok], c[ok], v[ok]


def content_knn_graph(features: np.ndarray, k: int = 10, keep: np.ndarray | None = None,
                      centre: np.ndarray | None = None, exact: bool | None = None) -> sp.csr_matrix:
    """``content_topk`` symmetrised and sym-normalised: (n, n)."""
    return sym_norm(symmetric_max(*content_topk(features, k, keep, centre, exact), len(features)))


def bipartite_graph(train: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """LightGCN's normalised (U+I, U+I) adjacency of the train interactions (users first)."""
    u, i = train[:, 0], train[:, 1] + n_users
    rows, cols = np.concatenate([u, i]), np.concatenate([i, u])
    n = n_users + n_items
    return sym_norm(sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)))
