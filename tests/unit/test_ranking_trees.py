"""LightGBM models scored in NumPy (ranking/trees.py) give LightGBM's own scores, including the edge cases."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from fusionrec.ranking.ranker import LightGBMRanker, load_ranker
from fusionrec.ranking.trees import CompiledTrees


def _data(seed: int, rows: int = 3000, features: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    y = np.sin(x[:, 0]) + (x[:, 1] > 0.3) - 0.5 * np.nan_to_num(x[:, 2]) + 0.1 * rng.normal(size=rows)
    x[rng.random(x.shape) < 0.08] = np.nan  # missing values, so that splits learn default directions
    x[rng.random(x.shape) < 0.08] = 0.0
    return x, y


def _inputs(compiled: CompiledTrees, x: np.ndarray) -> np.ndarray:
    """Rows that hit every edge: exact thresholds, just above them, NaN, 0, -0, ±1e-36 (read as 0), ±inf."""
    rng = np.random.default_rng(1)
    rows = x[:500].copy()
    for j, f in enumerate(compiled.features):
        thr = compiled.thresholds[j]
        picks = rng.integers(0, len(thr), 500)
        at = rng.random(500) < 0.3
        rows[at, f] = thr[picks[at]]
        above = rng.random(500) < 0.2
        rows[above, f] = np.nextafter(thr[picks[above]], np.inf)
    specials = np.array([np.nan, 0.0, -0.0, 1e-36, -1e-36, np.inf, -np.inf])
    odd = rng.random(rows.shape) < 0.1
    rows[odd] = specials[rng.integers(0, len(specials), odd.sum())]
    return rows


@pytest.mark.parametrize("params", [
    {"objective": "regression", "num_leaves": 7},
    {"objective": "regression", "num_leaves": 31, "zero_as_missing": True},  # Zero missing type, uint32 masks
    {"objective": "regression", "num_leaves": 12, "use_missing": False},  # missing type None: NaN reads as 0
])
def test_compiled_trees_score_like_lightgbm(params):
    x, y = _data(0)
    booster = lgb.train({**params, "verbose": -1, "min_data_in_leaf": 5, "seed": 0}, lgb.Dataset(x, y),
                        num_boost_round=60)
    compiled = CompiledTrees.from_dump(booster.dump_model())
    assert compiled is not None
    rows = _inputs(compiled, x)
    np.testing.assert_allclose(compiled.predict(rows), booster.predict(rows, num_threads=1), rtol=0, atol=1e-9)
    np.testing.assert_allclose(compiled.predict(rows.astype(np.float32)),
                               booster.predict(rows.astype(np.float32), num_threads=1), rtol=0, atol=1e-9)


def test_the_missing_types_under_test_occur():
    """The parametrised models above really contain each missing type (else the test would prove less)."""
    seen = set()
    for params in ({"num_leaves": 7}, {"num_leaves": 31, "zero_as_missing": True}, {"use_missing": False}):
        x, y = _data(0)
        dump = lgb.train({"objective": "regression", "verbose": -1, "min_data_in_leaf": 5, **params},
                         lgb.Dataset(x, y), num_boost_round=20).dump_model()
        stack = [t["tree_structure"] for t in dump["tree_info"]]
        while stack:
            node = stack.pop()
            if "split_feature" in node:
                seen.add(node["missing_type"])
                stack += [node["left_child"], node["right_child"]]
    assert seen == {"None", "Zero", "NaN"}


def test_models_it_cannot_score_stay_with_lightgbm():
    x, y = _data(2)
    x[:, 3] = np.random.default_rng(0).integers(0, 5, len(x))
    cat = lgb.train({"objective": "regression", "verbose": -1, "min_data_in_leaf": 5}, lgb.Dataset(
        x, y + x[:, 3] % 2, categorical_feature=[3]), num_boost_round=20)
    assert CompiledTrees.from_dump(cat.dump_model()) is None  # categorical splits
    binary = lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(x, (y > 0).astype(float)), 10)
    assert CompiledTrees.from_dump(binary.dump_model()) is None  # a sigmoid output
    squared = lgb.train({"objective": "regression", "reg_sqrt": True, "verbose": -1}, lgb.Dataset(x, np.abs(y)), 10)
    assert CompiledTrees.from_dump(squared.dump_model()) is None  # predictions are the sum squared


def test_a_ranker_serves_compiled_scores_and_selects_rounds_with_lightgbm(tmp_path):
    x, y = _data(3, rows=1200)
    labels = (y > np.quantile(y, 0.8)).astype(float)
    names = ["retrieval_score"] + [f"f{i}" for i in range(1, 6)]  # the base term reads retrieval_score
    ranker = LightGBMRanker(names, {"num_boost_round": 40, "min_data_in_leaf": 10, "base_scale": 0.5}
                            ).fit(x, labels, np.full(40, 30))
    assert ranker._compiled is not None
    rows = _inputs(ranker._compiled, x)
    rows[~np.isfinite(rows[:, 0]), 0] = 0.0  # an infinite base term would compare inf with inf
    lgb_scores = ranker._booster.predict(rows, num_threads=1) + 0.5 * np.nan_to_num(rows[:, 0])
    np.testing.assert_allclose(ranker.predict(rows), lgb_scores.astype(np.float32), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ranker.predict(rows, rounds=10),
                               ranker._booster.predict(rows, num_iteration=10) + 0.5 * np.nan_to_num(rows[:, 0]),
                               rtol=1e-6, atol=1e-6)
    loaded = load_ranker(ranker.save(tmp_path / "r.json"))
    assert loaded._compiled is not None
    np.testing.assert_array_equal(loaded.predict(rows), ranker.predict(rows))
