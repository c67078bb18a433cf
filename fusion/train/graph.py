"""Sparse graphs for the graph variants: item-item (co-occurrence + content kNN) and user-item (LightGCN)."""

from __future__ import annotations

import numpy as np
import torch

#: Graphs up to this many nodes are densified: dense matmul backward is far faster than sparse on CPU.
DENSE_GRAPH_MAX_NODES = 8000


def maybe_dense(graph: torch.Tensor) -> torch.Tensor:
    """A sparse (n, n) graph as a dense tensor when ``n <= DENSE_GRAPH_MAX_NODES``, else unchanged."""
    return graph.to_dense() if graph.shape[0] <= DENSE_GRAPH_MAX_NODES else graph


def _sym_norm(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int) -> torch.Tensor:
    """Sparse D^-1/2 A D^-1/2 for an (n, n) matrix given as COO triples."""
    deg = np.bincount(rows, weights=vals, minlength=n)
    inv = np.where(deg > 0, deg, 1.0) ** -0.5
    vals = vals * inv[rows] * inv[cols]
    idx = torch.as_tensor(np.stack([rows, cols]), dtype=torch.long)
    return torch.sparse_coo_tensor(idx, torch.as_tensor(vals, dtype=torch.float32), (n, n),
                                   check_invariants=True).coalesce()


def _topk_rows(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep each row's k largest entries (diagonal excluded) -> symmetric COO triples."""
    sim = sim.copy()
    np.fill_diagonal(sim, -np.inf)
    k = min(k, sim.shape[1] - 1)
    cols = np.argpartition(-sim, k, axis=1)[:, :k]
    rows = np.repeat(np.arange(sim.shape[0]), k)
    vals = np.take_along_axis(sim, cols, 1).ravel()
    keep = np.isfinite(vals) & (vals > 0)
    r, c, v = rows[keep], cols.ravel()[keep], vals[keep]
    # Symmetrise (max of both directions) so the normalised operator is symmetric.
    r2, c2, v2 = np.concatenate([r, c]), np.concatenate([c, r]), np.concatenate([v, v])
    key = r2 * sim.shape[0] + c2
    order = np.lexsort((-v2, key))
    key, r2, c2, v2 = key[order], r2[order], c2[order], v2[order]
    first = np.r_[True, key[1:] != key[:-1]]
    return r2[first], c2[first], v2[first]


def cooccurrence_graph(train: np.ndarray, n_users: int, n_items: int, k: int = 20) -> torch.Tensor:
    """Items co-consumed by the same users (cosine of train columns), top-k per item, sym-normalised.

    Returns:
        sparse (n_items, n_items).
    """
    r = np.zeros((n_users, n_items), dtype=np.float32)
    r[train[:, 0], train[:, 1]] = 1.0
    norms = np.sqrt(r.sum(0)).clip(min=1.0)
    sim = (r.T @ r) / norms[:, None] / norms[None, :]
    return _sym_norm(*_topk_rows(sim, k), n_items)


def content_knn_graph(features: np.ndarray, k: int = 10, keep: np.ndarray | None = None,
                      centre: np.ndarray | None = None) -> torch.Tensor:
    """Items with similar content (cosine of (n, d) features), top-k per item, sym-normalised.

    Args:
        keep: (n,) bool; items outside it get no edges (cold items stay content-only, as served).
        centre: (n,) bool rows whose mean centres the features (default all; held-out items excluded).
    """
    x = features - features[centre if centre is not None else slice(None)].mean(0, keepdims=True)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    sim = (x @ x.T).astype(np.float32)
    if keep is not None:
        sim[~keep, :] = -np.inf
        sim[:, ~keep] = -np.inf
    return _sym_norm(*_topk_rows(sim, k), len(x))


def bipartite_graph(train: np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """LightGCN's normalised (U+I, U+I) adjacency of the train interactions."""
    u, i = train[:, 0], train[:, 1] + n_users
    rows, cols = np.concatenate([u, i]), np.concatenate([i, u])
    return _sym_norm(rows, cols, np.ones(len(rows)), n_users + n_items)
