"""Full-ranking top-K metrics (Recall, NDCG, Precision, item coverage), MMRec/RecBole definitions."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def hit_matrix(topk: np.ndarray, positives: list[np.ndarray]) -> np.ndarray:
    """(u, K) item ids ranked best first + per-row positive ids -> (u, K) bool hits."""
    return np.stack([np.isin(row, pos) for row, pos in zip(topk, positives)]) if len(topk) else \
        np.zeros((0, topk.shape[1] if topk.ndim == 2 else 0), dtype=bool)


def recall_at(hits: np.ndarray, n_pos: np.ndarray, k: int) -> np.ndarray:
    """Per user: hits in the top k / number of positives (not min(k, n_pos), as MMRec)."""
    return hits[:, :k].sum(1) / n_pos


def precision_at(hits: np.ndarray, k: int) -> np.ndarray:
    """Per user: hits in the top k / k."""
    return hits[:, :k].sum(1) / k


def ndcg_at(hits: np.ndarray, n_pos: np.ndarray, k: int) -> np.ndarray:
    """Per user: DCG of the top k (gain 1, log2(rank+1) discount) / ideal DCG with min(k, n_pos) hits."""
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    dcg = (hits[:, :k] * discount).sum(1)
    ideal = np.cumsum(discount)[np.minimum(n_pos, k) - 1]
    return dcg / ideal


def coverage_at(topk: np.ndarray, n_items: int, k: int) -> float:
    """Share of the catalogue that appears in at least one user's top k."""
    return float(len(np.unique(topk[:, :k])) / n_items) if len(topk) else 0.0


def topk_items(score_fn: Callable[[np.ndarray], torch.Tensor], users: np.ndarray, exclude: list[np.ndarray],
               k: int, batch_size: int = 1024) -> np.ndarray:
    """Full ranking: top-k item ids per user with excluded (e.g. train) items masked out.

    Args:
        score_fn: (b,) user ids -> (b, n_items) scores.
        users: (u,) user ids; exclude: per user in ``users``, item ids never to recommend.
    Returns:
        (u, k) int64 item ids, best first.
    """
    out = []
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        scores = score_fn(batch).detach().float().clone()
        rows = np.concatenate([np.full(len(exclude[start + j]), j) for j in range(len(batch))] + [np.zeros(0)])
        cols = np.concatenate([exclude[start + j] for j in range(len(batch))] + [np.zeros(0)])
        scores[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)] = -torch.inf
        out.append(torch.topk(scores, k, dim=1).indices.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def per_user_metrics(topk: np.ndarray, positives: list[np.ndarray], ks: tuple[int, ...] = (10, 20)
                     ) -> dict[str, np.ndarray]:
    """Per-user Recall/NDCG/Precision@k (the inputs of paired significance tests; users without a positive
    are left out, as in ``ranking_metrics``).

    Returns:
        {"recall@10": (u',) float64, "ndcg@10": ..., "precision@10": ..., ...} over the users with a positive.
    """
    keep = np.asarray([len(p) > 0 for p in positives], dtype=bool)
    positives = [p for p, k in zip(positives, keep) if k]
    n_pos = np.asarray([len(p) for p in positives])
    hits = hit_matrix(topk[keep], positives)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at(hits, n_pos, k) if len(hits) else np.zeros(0)
        out[f"ndcg@{k}"] = ndcg_at(hits, n_pos, k) if len(hits) else np.zeros(0)
        out[f"precision@{k}"] = precision_at(hits, k) if len(hits) else np.zeros(0)
    return out


def ranking_metrics(topk: np.ndarray, positives: list[np.ndarray], n_items: int,
                    ks: tuple[int, ...] = (10, 20)) -> dict[str, float]:
    """Mean metrics over users with at least one positive.

    Args:
        topk: (u, >= max(ks)) ranked item ids; positives: per user, its held-out item ids.
    Returns:
        {"recall@10": ..., "ndcg@10": ..., "precision@10": ..., "coverage@10": ..., ...}.
    """
    keep = np.asarray([len(p) > 0 for p in positives], dtype=bool)
    out: dict[str, float] = {k: float(v.mean()) if len(v) else 0.0
                             for k, v in per_user_metrics(topk, positives, ks).items()}
    for k in ks:
        out[f"coverage@{k}"] = coverage_at(topk[keep], n_items, k)
    out["users"] = float(keep.sum())
    return out
