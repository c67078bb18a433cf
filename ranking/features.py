"""Candidate features for the ranker: what the retrieval score (one inner product) cannot use.

Every feature is computed from the fusion model's public interface (fused vectors and
``contributions``, which splits any inner product in the fused space into per-part terms), so
the same code builds training lists offline and re-scores candidates while serving. Features
a request cannot provide (no query, no attributes, no timestamps) are NaN; LightGBM treats
them as missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

#: (vector (dim,), items (n, dim)) -> part -> (n,) additive parts of ``items @ vector`` (FusionModel.contributions).
Contributions = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]

#: Most recent history items the "recent" features look at.
RECENT_ITEMS = 3


@dataclass
class CandidateList:
    """One user's (or request's) candidates and what the ranker may know about them.

    Attributes:
        user: (dim,) the user vector the candidates were retrieved with.
        history: (h, dim) fused vectors of the user's items, oldest first; h may be 0.
        fused: (n, dim) the candidates' fused vectors, in retrieval order.
        scores: (n,) retrieval scores (``fused @ user``).
        query_user: (dim,) the user tower over the query content alone; None without a query.
        popularity: (n,) interactions recorded per candidate; None when unknown.
        age_s: (n,) seconds since each candidate was last interacted with; None when unknown.
        attributes: per candidate, its attributes; None when unknown.
        history_attributes: per history item, its attributes; None when unknown.
    """

    user: np.ndarray
    history: np.ndarray
    fused: np.ndarray
    scores: np.ndarray
    query_user: np.ndarray | None = None
    popularity: np.ndarray | None = None
    age_s: np.ndarray | None = None
    attributes: list[Mapping[str, object]] | None = None
    history_attributes: list[Mapping[str, object]] | None = None


def candidate_features(lst: CandidateList, contributions: Contributions,
                       wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    """Feature name -> (n,) float32 column for every candidate of ``lst``.

    Args:
        contributions: the fusion model's ``contributions`` (per-part similarity in the fused space).
        wanted: names the ranker uses; costly groups (attribute matches) are skipped when absent.
    """
    n = len(lst.scores)
    out: dict[str, np.ndarray] = {}
    nan = np.full(n, np.nan, np.float32)
    scores = np.asarray(lst.scores, np.float32)
    out["retrieval_score"] = scores
    out["retrieval_rank"] = np.argsort(np.argsort(-scores, kind="stable"), kind="stable").astype(np.float32)
    out["retrieval_gap"] = (scores.max() - scores) if n else scores
    out.update(_parts("user", contributions(lst.user, lst.fused)))
    out.update(_history_features(lst, contributions, nan))
    if lst.query_user is not None:
        out.update(_parts("query", contributions(lst.query_user, lst.fused)))
    out["pop_log"] = nan if lst.popularity is None else np.log1p(lst.popularity).astype(np.float32)
    out["pop_rank"] = nan if lst.popularity is None else _rank_share(np.asarray(lst.popularity, np.float64))
    out["age_log_s"] = nan if lst.age_s is None else np.log1p(np.maximum(lst.age_s, 0)).astype(np.float32)
    if wanted is None or "attr_match" in wanted:
        out["attr_match"] = attribute_match(lst.attributes, lst.history_attributes, n)
    return out


def _history_features(lst: CandidateList, contributions: Contributions, nan: np.ndarray) -> dict[str, np.ndarray]:
    """Similarity of each candidate to the user's history: per part to its mean and to its latest item,
    and item-to-item (the strongest match, the top three, the most recent items)."""
    hist = np.asarray(lst.history, np.float32).reshape(-1, lst.fused.shape[1])
    out: dict[str, np.ndarray] = {"hist_len_log": np.full(len(nan), np.log1p(len(hist)), np.float32)}
    if not len(hist):
        return out | {k: nan for k in ("hist_max", "hist_top3", "recent_mean")}
    out.update(_parts("hist", contributions(hist.mean(axis=0), lst.fused)))
    out.update(_parts("last", contributions(hist[-1], lst.fused)))
    sims = lst.fused @ hist.T  # (n, h) item-to-item similarity in the fused space
    top = np.sort(sims, axis=1)[:, ::-1]
    out["hist_max"] = top[:, 0].astype(np.float32)
    out["hist_top3"] = top[:, :3].mean(axis=1).astype(np.float32)
    out["recent_mean"] = sims[:, -RECENT_ITEMS:].mean(axis=1).astype(np.float32)
    return out


def _parts(prefix: str, parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}_{p}": np.asarray(v, np.float32) for p, v in parts.items()}


def _rank_share(values: np.ndarray) -> np.ndarray:
    """Each value's rank among the list's, as a share (1 = the largest): comparable across list sizes."""
    if len(values) < 2:
        return np.ones(len(values), np.float32)
    return (np.argsort(np.argsort(values, kind="stable"), kind="stable") / (len(values) - 1)).astype(np.float32)


def attribute_match(attributes: list[Mapping[str, object]] | None,
                    history_attributes: list[Mapping[str, object]] | None, n: int) -> np.ndarray:
    """Per candidate: the share of (history item, categorical attribute) pairs whose value it shares.

    Categorical = string or bool values (numbers such as price or year are not matched exactly).
    NaN when either side is unknown or has no categorical attribute.
    """
    if not attributes or not history_attributes:
        return np.full(n, np.nan, np.float32)
    seen: dict[tuple[str, object], int] = {}
    pairs = 0
    for attrs in history_attributes:
        for key, value in attrs.items():
            if isinstance(value, (str, bool)):
                seen[(key, value)] = seen.get((key, value), 0) + 1
                pairs += 1
    if not pairs:
        return np.full(n, np.nan, np.float32)
    return np.asarray([sum(seen.get((k, v), 0) for k, v in attrs.items() if isinstance(v, (str, bool))) / pairs
                       for attrs in attributes], np.float32)


def feature_matrix(columns: dict[str, np.ndarray], names: list[str], n: int) -> np.ndarray:
    """(n, len(names)) float32 in the ranker's order; a name the list lacks is a NaN column."""
    out = np.full((n, len(names)), np.nan, np.float32)
    for j, name in enumerate(names):
        if name in columns:
            out[:, j] = columns[name]
    return out
