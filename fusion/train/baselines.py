"""Non-trained reference recommenders scored under the same protocol: MostPop and content-only ItemKNN."""

from __future__ import annotations

import numpy as np
import torch

from fusionrec.fusion.train.data import InteractionData


class ScoreTableNet:
    """Wraps a (n_users, n_items) score function so ``training.evaluate`` can rank it."""

    uses_history = False

    def __init__(self, score_fn) -> None:
        self.score_fn = score_fn

    def eval(self) -> "ScoreTableNet":
        return self

    def scores(self, users: torch.Tensor, hist: torch.Tensor, hist_mask: torch.Tensor, items=None) -> torch.Tensor:
        return self.score_fn(users.numpy())


def most_popular(data: InteractionData) -> ScoreTableNet:
    counts = torch.as_tensor(np.bincount(data.train[:, 1], minlength=data.n_items), dtype=torch.float32)
    return ScoreTableNet(lambda users: counts.expand(len(users), -1))


def content_knn(data: InteractionData, modality: str = "text", k: int = 50) -> ScoreTableNet:
    """ItemKNN on content: score(u, i) = sum over u's train items j of cos(x_j, x_i), top-k neighbours per item.

    Needs no interactions for item i, so it is the content-only reference for cold items.
    """
    x = data.features[modality].astype(np.float32)
    x = x - x.mean(0, keepdims=True)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    sim = x @ x.T  # (n, n)
    np.fill_diagonal(sim, 0.0)
    if k < len(sim):
        thresh = -np.partition(-sim, k - 1, axis=0)[k - 1]  # per column: keep each item's k nearest
        sim = np.where(sim >= thresh[None, :], sim, 0.0)
    hist = np.zeros((data.n_users, data.n_items), dtype=np.float32)
    hist[data.train[:, 0], data.train[:, 1]] = 1.0
    table = torch.as_tensor(hist @ sim)
    return ScoreTableNet(lambda users: table[torch.as_tensor(users)])
