"""A ranker trained to prefer one feature (popularity), for the ranking tests (unit and served)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusionrec.ranking.ranker import LightGBMRanker

FEATURES = ["retrieval_score", "pop_log"]


def popularity_lists(n_lists: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lists whose relevance is the candidate's popularity alone (retrieval score is noise).

    Returns:
        x (n_lists * n, 2) [retrieval_score, pop_log], graded labels (n_lists * n,), and the popularity counts.
    """
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-1, 1, size=(n_lists, n))
    counts = np.floor(np.exp(rng.uniform(0, np.log(60), size=(n_lists, n)))).astype(np.int64) - 1  # mostly small
    x = np.stack([scores.ravel(), np.log1p(counts).ravel()], axis=1).astype(np.float32)
    return x, counts.ravel().astype(np.float32), counts.ravel()


def train_popularity_ranker(path: Path | None = None, seed: int = 0) -> LightGBMRanker:
    """A lambdarank ranker that learned to order candidates by popularity; saved to ``path`` when given."""
    x, y, _ = popularity_lists(200, 30, seed)
    ranker = LightGBMRanker(FEATURES, {"num_leaves": 15, "min_data_in_leaf": 5, "learning_rate": 0.1,
                                       "num_boost_round": 150, "label_gain": list(range(60)),  # linear gains
                                       "lambdarank_truncation_level": 30}).fit(x, y, np.full(200, 30), seed=seed)
    if path is not None:
        ranker.save(path)
    return ranker
