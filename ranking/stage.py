"""The served ranking step: re-score retrieval's top N with a trained ranker, optionally diversify (MMR), keep k.

Plain NumPy over the fusion model's public interface; the retrieval engine (retrieval/engine.py)
calls it between the search and the answer.
"""

from __future__ import annotations

from itertools import repeat
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fusionrec.fusion.base import FusionModel
from fusionrec.ranking.features import CandidateList, candidate_features
from fusionrec.ranking.mmr import mmr_order
from fusionrec.ranking.ranker import Ranker, load_ranker


class RankingStage:
    """A trained ranker over the top ``candidates_n`` retrieval candidates, then MMR when ``mmr_lambda`` is set.

    Thread-safe: the only state besides the ranker is a popularity lookup rebuilt when the store's
    counts change.
    """

    def __init__(self, ranker: Ranker, candidates_n: int = 100, mmr_lambda: float | None = None) -> None:
        if candidates_n < 1:
            raise ValueError(f"candidates_n must be at least 1, got {candidates_n}")
        if mmr_lambda is not None and not 0.0 <= mmr_lambda <= 1.0:
            raise ValueError(f"mmr_lambda must be within [0, 1], got {mmr_lambda}")
        self.ranker = ranker
        self.candidates_n = int(candidates_n)
        self.mmr_lambda = mmr_lambda
        names = set(ranker.feature_names)
        #: what the engine must fetch for the ranker (other features are free)
        self.wants_attributes = "attr_match" in names
        self.wants_query = any(n.startswith("query_") for n in names)
        self._pop_source: object = None
        self._pop: dict[str, int] = {}

    @classmethod
    def from_file(cls, path: str | Path, candidates_n: int = 100, mmr_lambda: float | None = None) -> "RankingStage":
        return cls(load_ranker(path), candidates_n, mmr_lambda)

    def popularity(self, item_ids: Sequence[str], ranked: list[tuple[str, int]]) -> np.ndarray:
        """Interactions per item id from the store's ``popularity()`` list, looked up through a dict
        rebuilt only when the store hands out a new list (it keeps one until the next write)."""
        if ranked is not self._pop_source:
            self._pop, self._pop_source = dict(ranked), ranked
        return np.fromiter(map(self._pop.get, item_ids, repeat(0)), np.float32, count=len(item_ids))

    def rerank(self, model: FusionModel, lst: CandidateList, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Order the candidates of ``lst`` (retrieval order) by the ranker, MMR when configured.

        Returns:
            (m,) indices into the candidates, best first, m = min(k, n); (m,) their scores, non-increasing
            (the ranker's; with MMR each pick's marginal gain, capped by the previous pick's).
        """
        n = len(lst.scores)
        columns = candidate_features(lst, model.contributions, set(self.ranker.feature_names))
        scores = self.ranker.score(columns, n)
        if self.mmr_lambda is None:
            order = np.argsort(-scores, kind="stable")[:k]  # ties keep retrieval's order
            return order, scores[order]
        order = mmr_order(scores, lst.fused, k, self.mmr_lambda)
        rel = (scores - scores.min()) / max(float(np.ptp(scores)), 1e-12)
        picked = self.mmr_lambda * rel[order] - (1 - self.mmr_lambda) * _redundancy(lst.fused, order)
        return order, np.minimum.accumulate(picked).astype(np.float32)


def _redundancy(fused: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per pick, its largest cosine with an earlier pick (0 for the first): MMR's penalty term."""
    unit = fused[order] / np.linalg.norm(fused[order], axis=1, keepdims=True).clip(min=1e-12)
    sims = np.where(np.tri(len(order), k=-1, dtype=bool), unit @ unit.T, -np.inf)
    return np.concatenate([[0.0], sims[1:].max(axis=1)]) if len(order) > 1 else np.zeros(len(order))


def query_vector(model: FusionModel, query: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The user tower over the query content alone (the "query_*" features), or None without a usable query."""
    if not query:
        return None
    try:
        return model.user_vector(np.zeros((0, model.dim), np.float32), dict(query))
    except ValueError:  # only modalities this model was not trained on
        return None
