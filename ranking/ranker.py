"""Rankers: a small base class, LightGBM's lambdarank behind it, one JSON file per trained ranker, a registry by name."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fusionrec.ranking.features import feature_matrix
from fusionrec.ranking.trees import CompiledTrees

#: Serving scores a few hundred rows per request: one thread avoids OpenMP start-up costs per call.
SERVING_THREADS = 1


class Ranker(ABC):
    """Scores candidates from named feature columns (fusionrec.ranking.features); higher is better.

    Attributes:
        feature_names: the columns the ranker was trained on, in its order.
    """

    name: ClassVar[str]

    def __init__(self, feature_names: list[str], params: dict[str, Any] | None = None) -> None:
        self.feature_names = list(feature_names)
        self.params = dict(params or {})

    @abstractmethod
    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> "Ranker":
        """Learn from (rows, len(feature_names)) features, (rows,) graded labels, and the lengths of the
        consecutive per-user lists (``groups``, summing to rows)."""

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """(rows, len(feature_names)) -> (rows,) scores."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """What ``_from_state`` needs besides the feature names and params (JSON-serialisable)."""

    @classmethod
    @abstractmethod
    def _from_state(cls, feature_names: list[str], params: dict[str, Any], state: dict[str, Any]) -> "Ranker":
        """Rebuild a trained ranker."""

    def score(self, columns: dict[str, np.ndarray], n: int) -> np.ndarray:
        """(n,) scores of one candidate list given its feature columns (missing names are NaN)."""
        return self.predict(feature_matrix(columns, self.feature_names, n))

    def save(self, path: str | Path) -> Path:
        """Write the trained ranker as one JSON file (atomically); returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"ranker": self.name, "feature_names": self.feature_names, "params": self.params,
                "state": self._state()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, path)
        return path


class LightGBMRanker(Ranker):
    """Gradient-boosted trees with LightGBM's lambdarank objective (NDCG-driven pairwise swaps).

    With ``base_scale`` > 0 the trees learn a correction to the retrieval score: boosting starts from
    ``base_scale * retrieval_score`` (LightGBM's init_score) and the same term is added when scoring, so
    an untrained or weak correction keeps retrieval's order instead of replacing it.
    """

    name = "lambdarank"
    #: The feature the boosting starts from (``base_scale`` times it).
    BASE_FEATURE = "retrieval_score"
    #: Parameters of ours, not LightGBM's.
    OWN: ClassVar[tuple[str, ...]] = ("num_boost_round", "base_scale")
    DEFAULTS: ClassVar[dict[str, Any]] = {"objective": "lambdarank", "learning_rate": 0.03, "num_leaves": 7,
                                          "min_data_in_leaf": 500, "feature_fraction": 0.8, "bagging_fraction": 0.8,
                                          "bagging_freq": 1, "lambdarank_truncation_level": 20,
                                          "num_boost_round": 200, "base_scale": 0.0, "verbose": -1}

    def __init__(self, feature_names: list[str], params: dict[str, Any] | None = None) -> None:
        super().__init__(feature_names, {**self.DEFAULTS, **(params or {})})
        self._booster: Any = None
        self._compiled: CompiledTrees | None = None  # the same trees scored in NumPy (ranking/trees.py)

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> "LightGBMRanker":
        import lightgbm as lgb

        params = {k: v for k, v in self.params.items() if k not in self.OWN}
        params |= {"seed": seed, "num_threads": int(self.params.get("num_threads", 1)), "eval_at": [20]}
        train = lgb.Dataset(x, label=y, group=groups, feature_name=self.feature_names, init_score=self._base(x),
                            free_raw_data=True)
        self._booster = lgb.train(params, train, num_boost_round=int(self.params["num_boost_round"]))
        self._compiled = CompiledTrees.from_dump(self._booster.dump_model())
        return self

    def _base(self, x: np.ndarray) -> np.ndarray | None:
        """``base_scale * retrieval_score`` per row, or None without a base."""
        scale = float(self.params.get("base_scale", 0.0))
        if not scale:
            return None
        if self.BASE_FEATURE not in self.feature_names:
            raise ValueError(f"base_scale needs the {self.BASE_FEATURE!r} feature")
        return scale * np.nan_to_num(x[:, self.feature_names.index(self.BASE_FEATURE)])

    def predict(self, x: np.ndarray, rounds: int | None = None) -> np.ndarray:
        """Scores with every tree, or with the first ``rounds`` boosting rounds only (model selection).

        Every tree: in NumPy when the model compiles (same scores, several times faster on a candidate list).
        """
        if self._booster is None:
            raise RuntimeError("ranker not trained or loaded")
        if rounds is None and self._compiled is not None:
            scores = self._compiled.predict(x)
        else:
            scores = self._booster.predict(x, num_iteration=rounds, num_threads=SERVING_THREADS)
        base = self._base(x)
        return np.asarray(scores if base is None else scores + base, np.float32)

    def importance(self) -> dict[str, float]:
        """Total gain per feature (what the trees split on), largest first."""
        gains = self._booster.feature_importance(importance_type="gain")
        return dict(sorted(zip(self.feature_names, map(float, gains)), key=lambda kv: -kv[1]))

    def _state(self) -> dict[str, Any]:
        return {"model": self._booster.model_to_string()}

    @classmethod
    def _from_state(cls, feature_names: list[str], params: dict[str, Any], state: dict[str, Any]) -> "LightGBMRanker":
        import lightgbm as lgb

        ranker = cls(feature_names, params)
        ranker._booster = lgb.Booster(model_str=state["model"])
        ranker._compiled = CompiledTrees.from_dump(ranker._booster.dump_model())
        return ranker


class AveragedRanker(Ranker):
    """The mean score of several trained rankers over the same features (the few best configurations on
    valid): with about one labelled item per user, one ranker's choice among near-equal configurations
    is mostly noise, and averaging them lowers the variance of the order it serves."""

    name = "averaged"

    def __init__(self, feature_names: list[str], params: dict[str, Any] | None = None,
                 members: list[Ranker] | None = None) -> None:
        super().__init__(feature_names, params)
        self.members = list(members or [])
        if any(m.feature_names != self.feature_names for m in self.members):
            raise ValueError("averaged rankers must share one feature list")

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> "AveragedRanker":
        for k, member in enumerate(self.members):
            member.fit(x, y, groups, seed + k)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if not self.members:
            raise RuntimeError("averaged ranker without members")
        return np.mean([m.predict(x) for m in self.members], axis=0).astype(np.float32)

    def importance(self) -> dict[str, float]:
        """Members' gain shares, averaged (each member's total gain counts once)."""
        shares: dict[str, float] = dict.fromkeys(self.feature_names, 0.0)
        for member in self.members:
            gains = member.importance()  # type: ignore[attr-defined]
            total = sum(gains.values()) or 1.0
            for name, gain in gains.items():
                shares[name] += gain / total / len(self.members)
        return dict(sorted(shares.items(), key=lambda kv: -kv[1]))

    def _state(self) -> dict[str, Any]:
        return {"members": [{"ranker": m.name, "params": m.params, "state": m._state()} for m in self.members]}

    @classmethod
    def _from_state(cls, feature_names: list[str], params: dict[str, Any], state: dict[str, Any]) -> "AveragedRanker":
        members = [ranker_class(m["ranker"])._from_state(feature_names, m["params"], m["state"])
                   for m in state["members"]]
        return cls(feature_names, params, members)


RANKERS: dict[str, type[Ranker]] = {}


def register_ranker(cls: type[Ranker]) -> type[Ranker]:
    """Add a ranker class under its ``name``; a second class under a taken name fails loudly."""
    if cls.name in RANKERS and RANKERS[cls.name] is not cls:
        raise ValueError(f"ranker name {cls.name!r} is taken by {RANKERS[cls.name].__qualname__}")
    RANKERS[cls.name] = cls
    return cls


register_ranker(LightGBMRanker)
register_ranker(AveragedRanker)


def ranker_class(name: str) -> type[Ranker]:
    """The ranker class registered under ``name``; unknown names fail loudly, listing the known ones."""
    try:
        return RANKERS[name]
    except KeyError:
        raise ValueError(f"unknown ranker {name!r}; known: {sorted(RANKERS)}") from None


def load_ranker(path: str | Path) -> Ranker:
    """A trained ranker from the file ``Ranker.save`` wrote."""
    try:
        body = json.loads(Path(path).read_text())
        cls = ranker_class(body["ranker"])
        return cls._from_state(body["feature_names"], body["params"], body["state"])
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot load a ranker from {path}: {type(err).__name__}: {err}") from None
