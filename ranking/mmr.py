"""Maximal marginal relevance: a diversity re-rank of scored candidates (Carbonell & Goldstein, 1998)."""

from __future__ import annotations

import numpy as np


def mmr_order(relevance: np.ndarray, vectors: np.ndarray, k: int, lambda_: float) -> np.ndarray:
    """Greedy MMR: repeatedly pick ``argmax lambda * rel - (1 - lambda) * max cos(item, picked)``.

    Relevance is min-max scaled to [0, 1] first, so that ``lambda_`` weighs it against cosine
    similarity on one scale whatever the ranker's score range.

    Args:
        relevance: (n,) scores, higher is better.
        vectors: (n, d) item vectors (cosine similarity is taken between their directions).
        k: how many to pick (at most n).
        lambda_: 1 = relevance order; 0 = the most diverse picks after the first.
    Returns:
        (min(k, n),) int64 indices into the candidates, in pick order.
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"MMR lambda must be within [0, 1], got {lambda_}")
    rel = np.asarray(relevance, np.float64)
    n = len(rel)
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, np.int64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.zeros(n)
    unit = np.asarray(vectors, np.float64)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True).clip(min=1e-12)
    picked = [int(np.argmax(rel))]
    closest = unit @ unit[picked[0]]  # (n,) max similarity to anything picked so far
    free = np.ones(n, bool)
    free[picked[0]] = False
    for _ in range(k - 1):
        gain = np.where(free, lambda_ * rel - (1.0 - lambda_) * closest, -np.inf)
        best = int(np.argmax(gain))
        picked.append(best)
        free[best] = False
        closest = np.maximum(closest, unit @ unit[best])
    return np.asarray(picked, np.int64)
