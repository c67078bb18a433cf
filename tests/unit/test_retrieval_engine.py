"""RetrievalEngine without Ray: a real Milvus Lite file and the real weighted-v0 fusion model.

The catalog is built so that scores are known exactly: weighted-v0 projects each modality with an
orthonormal map, so with both modalities weighted 1 an item's score against another item is the
mean of their text and image cosines, and against a text-only query its text cosine / sqrt(2).
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fusionrec.core.errors import InvalidArgument, NotFound  # noqa: E402
from fusionrec.fusion.registry import get_fusion_model  # noqa: E402
from fusionrec.retrieval.base import FilterSpec, InteractionEvent, StoredItem, StoreSchema  # noqa: E402
from fusionrec.retrieval.engine import RetrievalEngine  # noqa: E402
from fusionrec.retrieval.query import QueryContent, RecommendQuery  # noqa: E402

DIMS = {"text": 4, "image": 3}
VERSIONS = {"text": "text-v1", "image": "image-v1"}
R2 = np.sqrt(2.0)

TEXT = {"a": [1, 0, 0, 0], "b": [0.8, 0.6, 0, 0], "c": [0.6, 0.8, 0, 0],
        "d": [0, 1, 0, 0], "e": [0, 0, 1, 0], "f": [0, 0, 0, 1]}
IMAGE = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [1, 0, 0], "d": [0, 0, 1], "e": [0, 1, 0], "f": [0, 0, 1]}
GENRE = {"a": "rock", "b": "pop", "c": "rock", "d": "pop", "e": "jazz", "f": "jazz"}


def weighted(block_dim: int = 4, **options):
    return get_fusion_model("weighted-v0", DIMS, block_dim=block_dim, **options)


def schema_of(model) -> StoreSchema:
    return StoreSchema(modality_dims=dict(DIMS), fused_dim=model.dim, encoder_versions=dict(VERSIONS),
                       model_version=model.version)


def catalog(model) -> list[StoredItem]:
    vectors = [{"text": np.asarray(TEXT[i], np.float32), "image": np.asarray(IMAGE[i], np.float32)} for i in TEXT]
    fused = model.item_vectors(vectors, list(TEXT))
    return [StoredItem(i, {"genre": GENRE[i]}, v, f, dict(VERSIONS), model.version)
            for i, v, f in zip(TEXT, vectors, fused)]


def ask(user_id: str = "", history: tuple[str, ...] = (), k: int = 3, filters=(), exclude=(),
        include_seen: bool = False) -> RecommendQuery:
    return RecommendQuery(user_id=user_id, history_item_ids=list(history), query=QueryContent(), k=k,
                          filters=list(filters), exclude_item_ids=list(exclude), include_seen=include_seen)


def text_query(*values: float) -> dict[str, np.ndarray]:
    return {"text": np.asarray(values, np.float32)}


def ids(ranked) -> list[str]:
    return [c.item_id for c in ranked.candidates]


@pytest.fixture
def model():
    return weighted()


@pytest.fixture(params=["memory", "milvus"])
def engine(request, tmp_path, model):
    eng = RetrievalEngine.open(str(tmp_path / "store.db"), schema_of(model), search_backend=request.param)
    assert eng.upsert(catalog(model)) == 6
    yield eng
    eng.close()


def test_items_through_the_engine(engine, model):
    assert engine.count() == 6
    got = engine.get(["a", "zz"])
    assert list(got) == ["a"] and got["a"].attributes == {"genre": "rock"}
    found, vecs = engine.fused_vectors(["zz", "c", "a"])
    assert found == ["c", "a"] and vecs.shape == (2, model.dim)
    np.testing.assert_allclose(vecs[1], got["a"].fused)
    np.testing.assert_allclose(vecs[1], model.item_vectors([got["a"].modality_vectors])[0], atol=1e-6)
    assert engine.fused_vectors(["zz"])[1].shape == (0, model.dim)
    assert engine.delete(["f", "zz"]) == ["f"] and engine.count() == 5


def test_recommend_by_query_only(engine, model):
    ranked = engine.recommend(ask(), text_query(1, 0, 0, 0), model, 10)
    assert ids(ranked) == ["a", "b", "c"]
    np.testing.assert_allclose(ranked.scores, [1 / R2, 0.8 / R2, 0.6 / R2], atol=1e-5)
    np.testing.assert_allclose(ranked.contributions["text"], ranked.scores, atol=1e-5)
    np.testing.assert_allclose(ranked.contributions["image"], 0, atol=1e-6)
    assert ranked.used_history is False


def test_recommend_by_two_query_modalities_splits_the_score(engine, model):
    query = text_query(1, 0, 0, 0) | {"image": np.asarray([1, 0, 0], np.float32)}
    ranked = engine.recommend(ask(), query, model, 10)
    assert ids(ranked) == ["a", "c", "b"]
    np.testing.assert_allclose(ranked.scores, [1.0, 0.8, 0.4], atol=1e-5)
    np.testing.assert_allclose(ranked.contributions["text"], [0.5, 0.3, 0.4], atol=1e-5)
    np.testing.assert_allclose(ranked.contributions["image"], [0.5, 0.5, 0.0], atol=1e-5)
    np.testing.assert_allclose(sum(ranked.contributions.values()), ranked.scores, atol=1e-5)


def test_recommend_by_stored_history_leaves_seen_items_out(engine, model):
    engine.record_interactions([InteractionEvent("u", "a", "click", 1.0)])
    ranked = engine.recommend(ask("u", k=2), {}, model, 10)
    assert ids(ranked) == ["c", "b"] and ranked.used_history is True
    np.testing.assert_allclose(ranked.scores, [0.8, 0.4], atol=1e-5)
    np.testing.assert_allclose(sum(ranked.contributions.values()), ranked.scores, atol=1e-5)
    assert ids(engine.recommend(ask("u", include_seen=True), {}, model, 10)) == ["a", "c", "b"]
    seen, vecs = engine.history_vectors("u", 10)
    assert seen == ["a"] and vecs.shape == (1, model.dim)


def test_recommend_by_history_item_ids(engine, model):
    engine.record_interactions([InteractionEvent("u", "e", "click", 1.0)])
    # the history sent with the request wins over the stored one
    ranked = engine.recommend(ask("u", history=("c", "unknown")), {}, model, 10)
    assert ids(ranked) == ["a", "b", "d"]
    np.testing.assert_allclose(ranked.scores, [0.8, 0.48, 0.4], atol=1e-5)
    np.testing.assert_allclose(ranked.contributions["text"], [0.3, 0.48, 0.4], atol=1e-5)


def test_history_limit_keeps_the_most_recent(engine, model):
    engine.record_interactions([InteractionEvent("u", "e", "click", 1.0), InteractionEvent("u", "a", "click", 2.0)])
    assert ids(engine.recommend(ask("u", k=2), {}, model, 1)) == ["c", "b"]  # only "a" counts; "e" is not seen
    assert "e" not in ids(engine.recommend(ask("u", k=5), {}, model, 2))


def test_exclusions_and_filters(engine, model):
    query = text_query(1, 0, 0, 0)
    assert ids(engine.recommend(ask(k=2, exclude=("a", "nope")), query, model, 10)) == ["b", "c"]
    pop = engine.recommend(ask(k=5, filters=[FilterSpec("genre", equals="pop")]), query, model, 10)
    assert ids(pop) == ["b", "d"]
    np.testing.assert_allclose(pop.scores, [0.8 / R2, 0.0], atol=1e-5)
    assert all(c.attributes == {"genre": "pop"} for c in pop.candidates)
    none = engine.recommend(ask(filters=[FilterSpec("genre", equals="blues")]), query, model, 10)
    assert (none.candidates, none.scores, none.contributions, none.used_history) == ([], [], {}, False)


def _interact(engine, counts: dict[str, int]) -> None:
    engine.record_interactions([InteractionEvent(f"u{n}", item_id, "click", float(n))
                                for item_id, times in counts.items() for n in range(times)])


def test_nothing_to_go_on_gives_the_most_popular_items(engine, model):
    _interact(engine, {"c": 3, "e": 2, "a": 1})  # b, d, f never interacted with
    cold = engine.recommend(ask("ghost"), {}, model, 10)
    assert cold.popular and not cold.used_history
    assert ids(cold) == ["c", "e", "a"]
    assert cold.scores == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    np.testing.assert_allclose(cold.contributions["popularity"], cold.scores)
    assert ids(engine.recommend(ask(history=("unknown",)), {}, model, 10)) == ["c", "e", "a"]
    # Filters and exclusions hold; too few popular matches are filled with other matching items.
    rock = [FilterSpec("genre", equals="rock")]
    assert ids(engine.recommend(ask("ghost", filters=rock, exclude=("c",)), {}, model, 10)) == ["a"]
    jazz = engine.recommend(ask("ghost", k=2, filters=[FilterSpec("genre", equals="jazz")]), {}, model, 10)
    assert ids(jazz) == ["e", "f"] and jazz.scores == pytest.approx([2 / 6, 0.0])
    # Query content is something to go on: no popularity then.
    by_query = engine.recommend(ask("ghost"), text_query(0, 0, 1, 0), model, 10)
    assert ids(by_query)[0] == "e" and not by_query.popular


def test_popularity_follows_new_interactions_and_deletes(engine, model):
    _interact(engine, {"a": 1})
    assert ids(engine.popular(1)) == ["a"]
    _interact(engine, {"d": 2})
    assert ids(engine.popular(1)) == ["d"]
    engine.delete(["d"])
    assert ids(engine.popular(1)) == ["a"]
    assert ids(engine.popular(2, chunk=1))[0] == "a"  # chunked lookups skip the deleted item


def test_a_query_the_model_cannot_use_is_invalid(engine, model):
    with pytest.raises(InvalidArgument, match=re.escape(f"fusion model {model.version} cannot use this request")):
        engine.recommend(ask(), {"audio": np.ones(3, np.float32)}, model, 10)


def test_record_interactions_refuses_unknown_items_and_records_nothing(engine, model):
    events = [InteractionEvent("u2", "a", "click", 1.0), InteractionEvent("u2", "zz", "click", 2.0)]
    with pytest.raises(NotFound, match=r"unknown items \['zz'\]"):
        engine.record_interactions(events)
    assert engine.history_vectors("u2", 10)[0] == []
    assert engine.record_interactions(events[:1]) == 1
    assert engine.history_vectors("u2", 10)[0] == ["a"]


def test_reindex_moves_to_another_model(engine, model, tmp_path):
    engine.record_interactions([InteractionEvent("u", "a", "click", 1.0)])
    before = engine.fused_vectors(["a", "b"])[1]
    other = weighted(block_dim=8, weights={"text": 3.0, "image": 1.0})
    assert other.version != model.version and other.dim == 16

    assert engine.reindex(other, batch_size=4) == 6
    assert engine.schema.model_version == other.version and engine.schema.fused_dim == 16
    found, after = engine.fused_vectors(["a", "b"])
    assert found == ["a", "b"] and after.shape == (2, 16)
    np.testing.assert_allclose(after, other.item_vectors([{"text": np.asarray(TEXT[i], np.float32),
                                                          "image": np.asarray(IMAGE[i], np.float32)}
                                                         for i in ("a", "b")]), atol=1e-6)
    assert before.shape == (2, 8)
    assert engine.recommend(ask("u"), {}, model, 10) is None  # the old model no longer scores
    ranked = engine.recommend(ask("u", k=2), {}, other, 10)
    # text weighs 3, image 1: c (text .6, image 1) = (3 * .6 + 1) / 4, b = 3 * .8 / 4
    assert ids(ranked) == ["c", "b"]
    np.testing.assert_allclose(ranked.scores, [0.7, 0.6], atol=1e-5)


def test_open_over_another_models_vectors_then_reindex(tmp_path, model):
    """A store written with another fusion model (and fused dim) opens as stored; reindex moves it."""
    path = str(tmp_path / "store.db")
    other = weighted(block_dim=8)
    first = RetrievalEngine.open(path, schema_of(other))
    first.upsert(catalog(other))
    first.close()
    engine = RetrievalEngine.open(path, schema_of(model))
    try:
        assert engine.schema.model_version == other.version and engine.schema.fused_dim == other.dim
        assert ids(engine.recommend(ask(), text_query(1, 0, 0, 0), other, 10)) == ["a", "b", "c"]
        assert engine.reindex(model) == 6 and engine.schema == schema_of(model)
        assert ids(engine.recommend(ask(), text_query(1, 0, 0, 0), model, 10)) == ["a", "b", "c"]
    finally:
        engine.close()


def test_importing_the_engine_does_not_load_ray():
    code = ("import sys, fusionrec.retrieval.engine; "
            "print(sorted(m for m in ('ray', 'pymilvus') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
