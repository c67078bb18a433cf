"""Training lists for the ranker from an interaction data set, and ranker fitting with selection on valid only.

Candidates are the top N of the trained retrieval model for each user (user tower over the train
history, train items excluded: the served path and the quality protocol alike); labels are the
user's held-out items of one split. The ranker learns on valid labels; test labels only score it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fusionrec.fusion.base import FusionModel
from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.metrics import per_user_metrics, topk_items
from fusionrec.ranking.features import CandidateList, candidate_features
from fusionrec.ranking.ranker import AveragedRanker, LightGBMRanker, Ranker

#: History events a user vector and the history features use (the service's default limits.max_history).
HISTORY_LIMIT = 200
#: Hyper-parameter grid searched on the valid split (fit on half the valid users, NDCG@20 on the other half).
#: Small, strongly regularised trees: a list holds a couple of positives among hundreds of candidates, and
#: larger trees fitted valid users' noise (measured on lfm2k: every larger setting lost NDCG on held-out users).
GRID: dict[str, list[Any]] = {"num_leaves": [3, 7], "base_scale": [0.0, 6.7]}
#: Boosting rounds tried per grid point (read off one fit at its largest round count).
ROUNDS = (50, 100, 200, 400)
#: The served ranker averages the scores of this many best (grid point, rounds) settings on valid: the
#: selection half's NDCG@20 separates the top few by less than its noise, and their mean varies less.
AVERAGE_TOP = 3


@dataclass
class CandidateSet:
    """Every user's retrieval candidates and their features (one row per (user, candidate)).

    Attributes:
        users: (u,) user ids with a train history; items: (u, n) candidate ids, retrieval order.
        x: (u * n, f) float32 features, user-major; feature_names: the f column names.
        vectors: (n_items, dim) the served item vectors.
    """

    users: np.ndarray
    items: np.ndarray
    x: np.ndarray
    feature_names: list[str]
    vectors: np.ndarray  # (n_items, dim) served item vectors (MMR's similarity)
    meta: dict[str, Any] = field(default_factory=dict)

    def rows(self, pos: np.ndarray) -> np.ndarray:
        """Feature rows of the users at positions ``pos`` (into ``users``), user-major."""
        n = self.items.shape[1]
        return self.x.reshape(len(self.users), n, -1)[pos].reshape(-1, self.x.shape[1])

    def labels(self, positives: list[np.ndarray], pos: np.ndarray) -> np.ndarray:
        """(len(pos), n) 1.0 where the candidate is one of the user's ``positives`` (indexed by user id)."""
        return np.stack([np.isin(self.items[p], positives[self.users[p]]) for p in pos]).astype(np.float32)


def build_candidates(model: FusionModel, data: InteractionData, n: int, history_limit: int = HISTORY_LIMIT
                     ) -> CandidateSet:
    """Top ``n`` retrieval candidates per user with a train history, and their ranking features."""
    items = model.item_vectors([{m: data.features[m][i] for m in data.features} for i in range(data.n_items)],
                               [str(i) for i in range(data.n_items)])
    train_items = data.user_items("train")
    users = np.asarray([u for u in range(data.n_users) if len(train_items[u])], np.int64)
    user_vecs = np.stack([model.user_vector(items[train_items[u][-history_limit:]], {}) for u in users])
    row_of = {int(u): r for r, u in enumerate(users)}
    table = torch.as_tensor(items)

    def score(batch: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(user_vecs[[row_of[int(u)] for u in batch]]) @ table.T

    cand = topk_items(score, users, [train_items[u] for u in users], n)
    popularity = np.bincount(data.train[:, 1], minlength=data.n_items).astype(np.float32)
    columns = []
    for r, u in enumerate(users):
        fused = items[cand[r]]
        lst = CandidateList(user=user_vecs[r], history=items[train_items[u][-history_limit:]], fused=fused,
                            scores=fused @ user_vecs[r], popularity=popularity[cand[r]])
        columns.append(candidate_features(lst, model.contributions))
    names = [k for k in columns[0] if not all(np.isnan(c[k]).all() for c in columns)]  # never known offline
    x = np.concatenate([np.stack([c[k] for k in names], axis=1) for c in columns]).astype(np.float32)
    return CandidateSet(users, cand, x, names, items, {"n": n, "history_limit": history_limit})


def reorder(cs: CandidateSet, pos: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """(len(pos), k) candidate ids of the users at ``pos``, by ``scores`` ((len(pos) * n,), user-major)."""
    order = np.argsort(-scores.reshape(len(pos), -1), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cs.items[pos], order, axis=1)


def fit_ranker(cs: CandidateSet, positives: list[np.ndarray], pos: np.ndarray, params: dict[str, Any],
               seed: int) -> LightGBMRanker:
    """A lambdarank ranker on the users at ``pos``; lists without a positive among the candidates teach
    nothing (lambdarank has no pair to swap) and are left out."""
    y = cs.labels(positives, pos)
    useful = pos[y.sum(1) > 0]
    y = y[y.sum(1) > 0]
    n = cs.items.shape[1]
    return LightGBMRanker(cs.feature_names, params).fit(cs.rows(useful), y.reshape(-1),
                                                         np.full(len(useful), n), seed=seed)


def fit_averaged(cs: CandidateSet, positives: list[np.ndarray], pos: np.ndarray,
                 configs: dict[str, Any] | list[dict[str, Any]], seed: int) -> Ranker:
    """One ranker per parameter set in ``configs`` (fit_ranker), their scores averaged; one set: that ranker."""
    configs = [configs] if isinstance(configs, dict) else list(configs)
    rankers = [fit_ranker(cs, positives, pos, c, seed) for c in configs]
    return rankers[0] if len(rankers) == 1 else AveragedRanker(cs.feature_names, {"configs": configs}, rankers)


def valid_halves(cs: CandidateSet, valid: list[np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(every, fit half, select half) positions into ``cs.users`` of users with valid items (seeded halves)."""
    pos = np.flatnonzero([len(valid[u]) > 0 for u in cs.users])
    perm = np.random.default_rng(seed + 101).permutation(pos)
    return pos, np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])


def select_and_fit(cs: CandidateSet, valid: list[np.ndarray], seed: int, k: int = 20
                   ) -> tuple[Ranker, dict[str, Any]]:
    """Choose hyper-parameters on the valid split only, then refit on every valid user.

    Valid users are halved (seeded): each grid point fits on one half at the largest round count and is
    scored by NDCG@k of the other half at every count of ``ROUNDS``; the ``AVERAGE_TOP`` best settings refit
    on both halves and their scores are averaged. Returns the ranker and the selection record (grid scores,
    the best params as "chosen", every averaged setting as "averaged").
    """
    pos, fit_pos, sel_pos = valid_halves(cs, valid, seed)
    sel_positives = [valid[u] for u in cs.users[sel_pos]]
    trials = []
    for values in itertools.product(*GRID.values()):
        params = dict(zip(GRID, values)) | {"num_boost_round": max(ROUNDS)}
        ranker = fit_ranker(cs, valid, fit_pos, params, seed)
        for rounds in ROUNDS:
            scores = ranker.predict(cs.rows(sel_pos), rounds)
            ndcg = per_user_metrics(reorder(cs, sel_pos, scores, k), sel_positives, (k,))[f"ndcg@{k}"].mean()
            trials.append({**params, "num_boost_round": rounds, f"valid_ndcg@{k}": float(ndcg)})
    ranked = sorted(trials, key=lambda t: -t[f"valid_ndcg@{k}"])  # stable: ties keep grid order
    configs = [{key: t[key] for key in [*GRID, "num_boost_round"]} for t in ranked[:max(1, AVERAGE_TOP)]]
    base = per_user_metrics(cs.items[sel_pos, :k], sel_positives, (k,))[f"ndcg@{k}"].mean()
    return fit_averaged(cs, valid, pos, configs, seed), {"trials": trials, "chosen": configs[0], "averaged": configs,
                                                         f"retrieval_valid_ndcg@{k}": float(base)}
