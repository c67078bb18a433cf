"""The ranking package without Ray: features on a real fusion model, real LightGBM rankers, MMR, the served stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusionrec.fusion.registry import get_fusion_model
from fusionrec.ranking.features import CandidateList, attribute_match, candidate_features, feature_matrix
from fusionrec.ranking.mmr import mmr_order
from fusionrec.ranking.ranker import (RANKERS, AveragedRanker, LightGBMRanker, Ranker, load_ranker, ranker_class,
                                      register_ranker)
from fusionrec.ranking.stage import RankingStage, query_vector
from ranking_support import FEATURES, popularity_lists, train_popularity_ranker

DIMS = {"text": 6, "image": 5}


@pytest.fixture(scope="module")
def model():
    return get_fusion_model("weighted-v0", DIMS, block_dim=4)


def items(model, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return model.item_vectors([{m: rng.normal(size=d).astype(np.float32) for m, d in DIMS.items()}
                               for _ in range(n)])


def a_list(model, n: int = 12, h: int = 5, seed: int = 0, **extra) -> CandidateList:
    vecs = items(model, n + h, seed)
    history, fused = vecs[:h], vecs[h:]
    user = model.user_vector(history, {})
    return CandidateList(user=user, history=history, fused=fused, scores=fused @ user, **extra)


def ndcg(order_labels: np.ndarray, k: int = 10) -> float:
    gains = (2.0 ** order_labels[:k] - 1) / np.log2(np.arange(2, min(k, len(order_labels)) + 2))
    ideal = np.sort(order_labels)[::-1][:k]
    best = ((2.0 ** ideal - 1) / np.log2(np.arange(2, len(ideal) + 2))).sum()
    return float(gains.sum() / best) if best else 0.0


# ---------------------------------------------------------------- features

def test_features_split_like_the_model_and_measure_history(model):
    lst = a_list(model, popularity=np.arange(12, dtype=np.float32))
    cols = candidate_features(lst, model.contributions)
    parts = sorted(k for k in cols if k.startswith("user_"))
    assert parts == ["user_image", "user_text"]
    np.testing.assert_allclose(sum(cols[p] for p in parts), lst.scores, atol=1e-5)  # per-modality attribution
    sims = lst.fused @ lst.history.T
    np.testing.assert_allclose(cols["hist_max"], sims.max(1), atol=1e-6)
    np.testing.assert_allclose(cols["recent_mean"], sims[:, -3:].mean(1), atol=1e-6)
    np.testing.assert_allclose(cols["hist_text"] + cols["hist_image"], lst.fused @ lst.history.mean(0), atol=1e-5)
    np.testing.assert_allclose(cols["last_text"] + cols["last_image"], sims[:, -1], atol=1e-5)
    assert cols["retrieval_rank"][np.argmax(lst.scores)] == 0 and sorted(cols["retrieval_rank"]) == list(range(12))
    np.testing.assert_allclose(cols["pop_log"], np.log1p(np.arange(12)), atol=1e-6)
    assert cols["pop_rank"][11] == 1.0 and cols["pop_rank"][0] == 0.0
    assert not any(k.startswith("query_") for k in cols)  # no query: no query features
    assert np.isnan(cols["attr_match"]).all() and np.isnan(cols["age_log_s"]).all()


def test_query_features_come_from_the_query_tower(model):
    query = {"text": np.random.default_rng(3).normal(size=6).astype(np.float32)}
    lst = a_list(model, query_user=query_vector(model, query))
    cols = candidate_features(lst, model.contributions)
    np.testing.assert_allclose(cols["query_text"] + cols["query_image"], lst.fused @ lst.query_user, atol=1e-5)
    assert query_vector(model, {}) is None


def test_features_without_history_are_missing_not_zero(model):
    lst = a_list(model)
    lst.history = np.zeros((0, model.dim), np.float32)  # e.g. a query-only request
    cols = candidate_features(lst, model.contributions)
    assert np.isnan(cols["hist_max"]).all() and cols["hist_len_log"][0] == 0.0
    assert "hist_text" not in cols


def test_attribute_match_counts_shared_categorical_values():
    history = [{"genre": "rock", "mood": "calm", "year": 1999}, {"genre": "pop", "mood": "calm"}]
    got = attribute_match([{"genre": "rock", "mood": "calm"}, {"genre": "jazz", "year": 1999}, {}], history, 3)
    np.testing.assert_allclose(got, [3 / 4, 0.0, 0.0])  # 4 categorical pairs; numbers never match exactly
    assert np.isnan(attribute_match([{"genre": "rock"}], None, 1)).all()


def test_feature_matrix_orders_columns_and_marks_missing_ones():
    x = feature_matrix({"b": np.array([1, 2], np.float32), "a": np.array([3, 4], np.float32)}, ["a", "zz", "b"], 2)
    np.testing.assert_array_equal(x[:, 0], [3, 4])
    assert np.isnan(x[:, 1]).all()
    np.testing.assert_array_equal(x[:, 2], [1, 2])


# ---------------------------------------------------------------- rankers

def test_lambdarank_learns_the_feature_that_decides_relevance(tmp_path):
    ranker = train_popularity_ranker(tmp_path / "pop.json")
    x, y, counts = popularity_lists(40, 30, seed=9)  # unseen lists
    scores = ranker.predict(x).reshape(40, 30)
    labels = y.reshape(40, 30)
    by_ranker = np.mean([ndcg(labels[i][np.argsort(-scores[i])]) for i in range(40)])
    by_retrieval = np.mean([ndcg(labels[i][np.argsort(-x.reshape(40, 30, 2)[i, :, 0])]) for i in range(40)])
    assert by_ranker > 0.95 > by_retrieval + 0.2
    assert next(iter(ranker.importance())) == "pop_log"


def test_a_saved_ranker_loads_and_scores_the_same(tmp_path):
    ranker = train_popularity_ranker(tmp_path / "pop.json", seed=1)
    loaded = load_ranker(tmp_path / "pop.json")
    assert isinstance(loaded, LightGBMRanker) and loaded.feature_names == FEATURES
    x, _, _ = popularity_lists(3, 30, seed=2)
    np.testing.assert_array_equal(loaded.predict(x), ranker.predict(x))
    body = json.loads((tmp_path / "pop.json").read_text())
    body["ranker"] = "no-such-ranker"
    (tmp_path / "bad.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match="unknown ranker 'no-such-ranker'; known: \\['averaged', 'lambdarank'\\]"):
        load_ranker(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot load a ranker"):
        load_ranker(tmp_path / "missing.json")


def test_an_averaged_ranker_scores_its_members_mean_and_survives_a_save(tmp_path):
    other = {"num_boost_round": 20, "min_data_in_leaf": 5, "label_gain": list(range(60)), "base_scale": 2.0}
    members = [train_popularity_ranker(seed=1), LightGBMRanker(FEATURES, other)]
    x, y, _ = popularity_lists(50, 30, seed=3)
    members[1].fit(x, y, np.full(50, 30), seed=0)
    ranker = AveragedRanker(FEATURES, {"configs": [m.params for m in members]}, members)
    lists, _, _ = popularity_lists(4, 30, seed=5)
    mean = (members[0].predict(lists) + members[1].predict(lists)) / 2
    np.testing.assert_allclose(ranker.predict(lists), mean, rtol=1e-6)
    assert not np.allclose(ranker.predict(lists), members[0].predict(lists))  # both members count
    loaded = load_ranker(ranker.save(tmp_path / "avg.json"))
    assert isinstance(loaded, AveragedRanker) and [type(m) for m in loaded.members] == [LightGBMRanker] * 2
    np.testing.assert_array_equal(loaded.predict(lists), ranker.predict(lists))
    shares = ranker.importance()
    assert next(iter(shares)) == "pop_log" and sum(shares.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="share one feature list"):
        AveragedRanker(["pop_log"], None, members)


def test_base_scale_starts_boosting_from_the_retrieval_score():
    x, y, _ = popularity_lists(100, 30, seed=4)
    params = {"num_boost_round": 60, "learning_rate": 0.1, "min_data_in_leaf": 5, "label_gain": list(range(60))}
    anchored = LightGBMRanker(FEATURES, {**params, "base_scale": 1e5}).fit(x, y, np.full(100, 30))
    free = LightGBMRanker(FEATURES, params).fit(x, y, np.full(100, 30))
    test, _, counts = popularity_lists(1, 30, seed=5)
    assert list(np.argsort(-anchored.predict(test))) == list(np.argsort(-test[:, 0]))  # a dominant base: retrieval's order
    assert np.corrcoef(free.predict(test), counts)[0, 1] > 0.8  # the trees alone follow popularity


def test_the_registry_refuses_a_second_class_under_a_taken_name():
    class Other(LightGBMRanker):
        name = "lambdarank"

    with pytest.raises(ValueError, match="ranker name 'lambdarank' is taken by LightGBMRanker"):
        register_ranker(Other)
    assert ranker_class("lambdarank") is LightGBMRanker and issubclass(RANKERS["lambdarank"], Ranker)
    with pytest.raises(ValueError, match="unknown ranker 'gbdt'"):
        ranker_class("gbdt")


# ---------------------------------------------------------------- MMR

def test_mmr_at_lambda_one_is_relevance_order():
    rel = np.array([0.1, 0.9, 0.5, 0.7])
    vecs = np.random.default_rng(0).normal(size=(4, 3))
    assert list(mmr_order(rel, vecs, 4, 1.0)) == [1, 3, 2, 0]


def test_mmr_demotes_a_near_duplicate_of_a_pick():
    vecs = np.array([[1, 0, 0], [0.99, 0.01, 0], [0, 1, 0], [0, 0, 1]], float)
    rel = np.array([1.0, 0.95, 0.6, 0.5])
    assert list(mmr_order(rel, vecs, 3, 1.0)) == [0, 1, 2]
    assert list(mmr_order(rel, vecs, 3, 0.5)) == [0, 2, 3]  # the duplicate of item 0 drops out of the top 3
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        mmr_order(rel, vecs, 3, 1.5)
    assert len(mmr_order(rel, vecs, 10, 0.5)) == 4


# ---------------------------------------------------------------- the served stage

def test_stage_orders_by_the_ranker_and_keeps_k(model, tmp_path):
    train_popularity_ranker(tmp_path / "pop.json")
    stage = RankingStage.from_file(tmp_path / "pop.json", candidates_n=50)
    lst = a_list(model, n=20, popularity=np.random.default_rng(2).permutation(20).astype(np.float32) * 3)
    order, scores = stage.rerank(model, lst, k=5)
    assert list(order) == list(np.argsort(-lst.popularity)[:5])
    assert list(order) != list(np.argsort(-lst.scores)[:5])
    assert np.all(np.diff(scores) <= 0)


def test_stage_with_mmr_scores_never_increase(model, tmp_path):
    train_popularity_ranker(tmp_path / "pop.json")
    stage = RankingStage.from_file(tmp_path / "pop.json", candidates_n=50, mmr_lambda=0.3)
    lst = a_list(model, n=20, seed=4, popularity=np.arange(20, dtype=np.float32))
    order, scores = stage.rerank(model, lst, k=8)
    relevance = stage.ranker.score(candidate_features(lst, model.contributions), 20)
    assert len(set(order.tolist())) == 8 and order[0] == np.argmax(relevance)  # the most relevant first
    assert list(order) != list(np.argsort(-relevance, kind="stable")[:8])  # then diversity changes the order
    assert np.all(np.diff(scores) <= 0)
    with pytest.raises(ValueError, match="mmr_lambda"):
        RankingStage(stage.ranker, 10, mmr_lambda=-0.1)


def test_stage_popularity_lookup_follows_the_store_list():
    stage = RankingStage(train_popularity_ranker(), 10)
    first = [("a", 5), ("b", 2)]
    np.testing.assert_array_equal(stage.popularity(["b", "a", "z"], first), [2, 5, 0])
    np.testing.assert_array_equal(stage.popularity(["b"], [("b", 7)]), [7])  # a new list: looked up again
