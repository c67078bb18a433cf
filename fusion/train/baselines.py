"""Non-trained reference recommenders scored under the same protocol: MostPop and content-only ItemKNN."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.knn import nearest


class ScoreTableNet:
    """Wraps a (b,) users -> (b, n_items) score function so ``training.evaluate`` can rank it."""

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
    """ItemKNN on content: score(u, i) = sum over u's train items j among i's k nearest items of cos(x_j, x_i).

    Needs no interactions for item i, so it is the content-only reference for cold items. The neighbour table
    is sparse (n_items x k, faiss kNN), and scores are made a batch of users at a time.
    """
    x = data.features[modality].astype(np.float32)
    x = x - x.mean(0, keepdims=True)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    ids, sims = nearest(x, k)  # row i: item i's nearest items j -> entry (j, i) of the similarity table
    ok = ids.ravel() >= 0
    sim = sp.csr_matrix((sims.ravel()[ok], (ids.ravel()[ok], np.repeat(np.arange(len(x)), ids.shape[1])[ok])),
                        shape=(len(x), len(x)))
    hist = sp.csr_matrix((np.ones(len(data.train), np.float32), (data.train[:, 0], data.train[:, 1])),
                         shape=(data.n_users, data.n_items))
    hist.data[:] = 1.0  # duplicates were summed: binarise
    table = (hist @ sim).tocsr()  # (n_users, n_items), sparse
    return ScoreTableNet(lambda users: torch.as_tensor(table[users].toarray()))
