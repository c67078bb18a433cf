"""The ranking stage inside RetrievalEngine, without Ray: a real Milvus Lite file, weighted-v0, a real LightGBM ranker."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("milvus_lite")

from fusionrec.fusion.registry import get_fusion_model  # noqa: E402
from fusionrec.ranking.ranker import LightGBMRanker  # noqa: E402
from fusionrec.ranking.stage import RankingStage  # noqa: E402
from fusionrec.retrieval.base import FilterSpec, InteractionEvent, StoredItem, StoreSchema  # noqa: E402
from fusionrec.retrieval.engine import RetrievalEngine  # noqa: E402
from fusionrec.retrieval.query import QueryContent, RecommendQuery  # noqa: E402
from ranking_support import train_popularity_ranker  # noqa: E402

DIMS = {"text": 8, "image": 6}
N_ITEMS = 40


@pytest.fixture(scope="module")
def model():
    return get_fusion_model("weighted-v0", DIMS, block_dim=4)


@pytest.fixture(params=["memory", "milvus"])
def engine(request, tmp_path, model):
    rng = np.random.default_rng(5)
    vectors = [{m: rng.normal(size=d).astype(np.float32) for m, d in DIMS.items()} for _ in range(N_ITEMS)]
    ids = [f"i{n:02d}" for n in range(N_ITEMS)]
    fused = model.item_vectors(vectors, ids)
    schema = StoreSchema(modality_dims=dict(DIMS), fused_dim=model.dim, encoder_versions={m: f"{m}-v1" for m in DIMS},
                         model_version=model.version)
    eng = RetrievalEngine.open(str(tmp_path / "store.db"), schema, search_backend=request.param)
    eng.upsert([StoredItem(i, {"half": "low" if n < N_ITEMS // 2 else "high"}, v, f, dict(schema.encoder_versions),
                           model.version) for n, (i, v, f) in enumerate(zip(ids, vectors, fused))])
    # popularity: item n has n % 7 events from other users; the user "u" has seen three items
    events = [InteractionEvent(f"other{j}", i, "click", float(j)) for n, i in enumerate(ids) for j in range(n % 7)]
    events += [InteractionEvent("u", i, "click", 100.0 + t) for t, i in enumerate(("i00", "i01", "i02"))]
    eng.record_interactions(events)
    yield eng
    eng.close()


def ask(k: int, filters=(), exclude=()) -> RecommendQuery:
    return RecommendQuery(user_id="u", history_item_ids=[], query=QueryContent(), k=k, filters=list(filters),
                          exclude_item_ids=list(exclude))


def popularity(item_id: str) -> int:
    return int(item_id[1:]) % 7


def test_without_a_ranker_the_answer_is_the_search(engine, model):
    ranked = engine.recommend(ask(6), {}, model, 50)
    _, history = engine.history_vectors("u", 50)
    user = model.user_vector(history, {})
    fused = np.stack([c.fused for c in ranked.candidates])
    np.testing.assert_allclose(ranked.scores, fused @ user, atol=1e-5)
    assert ranked.scores == sorted(ranked.scores, reverse=True)


def test_the_ranker_orders_candidates_and_filters_still_hold(engine, model, tmp_path):
    plain = engine.recommend(ask(N_ITEMS), {}, model, 50)
    engine.ranking = RankingStage(train_popularity_ranker(), candidates_n=N_ITEMS)
    ranked = engine.recommend(ask(8, [FilterSpec("half", equals="high")], ["i27"]), {}, model, 50)
    got = [c.item_id for c in ranked.candidates]
    assert len(got) == 8 and all(c.attributes["half"] == "high" for c in ranked.candidates)
    assert "i27" not in got and not {"i00", "i01", "i02"} & set(got)  # exclusions and seen items, as before
    pops = [popularity(i) for i in got]
    assert pops[0] == 6 and pops == sorted(pops, reverse=True)  # the ranker's feature decides the order
    retrieval_order = [c.item_id for c in plain.candidates if c.item_id in got]
    assert got != retrieval_order
    assert ranked.scores == sorted(ranked.scores, reverse=True)
    # explainable: each item's per-modality parts still split its retrieval score
    _, history = engine.history_vectors("u", 50)
    user = model.user_vector(history, {})
    fused = np.stack([c.fused for c in ranked.candidates])
    np.testing.assert_allclose(sum(ranked.contributions.values()), fused @ user, atol=1e-5)
    assert set(ranked.contributions) == {"text", "image"}


def test_the_ranker_sees_only_the_top_n_candidates(engine, model):
    plain_top5 = {c.item_id for c in engine.recommend(ask(5), {}, model, 50).candidates}
    engine.ranking = RankingStage(train_popularity_ranker(), candidates_n=5)
    ranked = engine.recommend(ask(3), {}, model, 50)
    got = [c.item_id for c in ranked.candidates]
    assert set(got) <= plain_top5 and len(got) == 3
    assert [popularity(i) for i in got] == sorted((popularity(i) for i in plain_top5), reverse=True)[:3]


def test_attribute_matches_reach_the_ranker(engine, model):
    rng = np.random.default_rng(1)
    match = rng.integers(0, 2, size=(100, 20)).astype(np.float32)  # share of history attributes matched
    x = np.stack([rng.uniform(-1, 1, size=match.shape).ravel(), match.ravel()], axis=1).astype(np.float32)
    ranker = LightGBMRanker(["retrieval_score", "attr_match"], {"num_boost_round": 30, "min_data_in_leaf": 5})
    ranker.fit(x, match.ravel(), np.full(100, 20))
    plain = engine.recommend(ask(12), {}, model, 50)
    assert {c.attributes["half"] for c in plain.candidates} == {"low", "high"}
    engine.ranking = RankingStage(ranker, candidates_n=N_ITEMS)
    ranked = engine.recommend(ask(12), {}, model, 50)
    assert {c.attributes["half"] for c in ranked.candidates} == {"low"}  # the history's value (i00-i02: low)
