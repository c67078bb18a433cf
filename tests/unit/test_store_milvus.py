"""MilvusStore items and search against a real Milvus Lite data dir (no mocks)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fusionrec.retrieval.base import FilterSpec, SchemaMismatch  # noqa: E402
from fusionrec.retrieval.milvus import MilvusStore  # noqa: E402
from milvus_store_support import FUSED_DIM, assert_matches, assert_same_item, brute_force, item, vec  # noqa: E402
from milvus_store_support import backend, catalog, db_path, store  # noqa: E402,F401 (fixtures)
from fusionrec.retrieval.expressions import build_filter, quote_string  # noqa: E402


# --------------------------------------------------------------------------- items


def test_upsert_get_roundtrip(store: MilvusStore):
    rng = np.random.default_rng(0)
    full = item("a", rng, {"genre": "rock", "year": 1999, "rating": 4.5, "live": True})
    text_only = item("b", rng, {"genre": "pop"}, modalities=("text",))
    fused_only = item("c", rng, {}, modalities=())
    store.upsert([full, text_only, fused_only])

    got = store.get(["a", "b", "c", "missing"])
    assert set(got) == {"a", "b", "c"}
    assert_same_item(got["a"], full)
    assert_same_item(got["b"], text_only)
    assert_same_item(got["c"], fused_only)
    assert store.get([]) == {}
    assert store.count() == 3


def test_upsert_replaces(store: MilvusStore):
    rng = np.random.default_rng(1)
    store.upsert([item("x", rng, {"genre": "rock", "year": 1990}), item("y", rng, {"genre": "pop"})])
    new = item("x", rng, {"genre": "jazz"}, modalities=("image",))
    store.upsert([new])
    got = store.get(["x"])["x"]
    assert_same_item(got, new)  # old "year" attribute and text vector are gone
    assert store.count() == 2
    hits = store.search(new.fused, 5, filters=[FilterSpec("genre", equals="rock")])
    assert hits == []


def test_delete_returns_existing_ids(store: MilvusStore):
    rng = np.random.default_rng(2)
    store.upsert([item(f"d{i}", rng) for i in range(3)])
    assert store.delete(["d1", "nope", "d1", "d2"]) == ["d1", "d2"]
    assert set(store.get(["d0", "d1", "d2"])) == {"d0"}
    assert store.count() == 1
    assert store.delete(["d1"]) == []
    assert store.delete([]) == []
    assert [c.item_id for c in store.search(vec(rng, FUSED_DIM), 10)] == ["d0"]


def test_count_and_iter_items(store: MilvusStore):
    rng = np.random.default_rng(3)
    items = [item(f"it{i}", rng, {"n": i}, modalities=("text",) if i % 2 else ("image",)) for i in range(23)]
    store.upsert(items)
    assert store.count() == 23
    seen = {}
    for batch in store.iter_items(batch_size=7):
        assert 0 < len(batch) <= 7
        for it in batch:
            assert it.item_id not in seen
            seen[it.item_id] = it
    assert set(seen) == {it.item_id for it in items}
    for it in items:
        assert_same_item(seen[it.item_id], it)


def test_upsert_validates_input(store: MilvusStore):
    rng = np.random.default_rng(4)
    bad_fused = item("v", rng)
    bad_fused.fused = vec(rng, FUSED_DIM + 1)
    with pytest.raises(ValueError, match="fused"):
        store.upsert([bad_fused])
    unknown = item("v", rng)
    unknown.modality_vectors["audio"] = vec(rng, 4)
    with pytest.raises(ValueError, match="audio"):
        store.upsert([unknown])
    with pytest.raises(ValueError, match="attribute name"):
        store.upsert([item("v", rng, {"bad name": 1})])
    nan = item("v", rng)
    nan.fused[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.upsert([nan])
    old_encoder = item("v", rng)
    old_encoder.encoder_versions["text"] = "minilm-v0"
    with pytest.raises(SchemaMismatch, match="minilm-v0"):
        store.upsert([old_encoder])
    assert store.count() == 0


# --------------------------------------------------------------------------- search


def test_search_order_matches_brute_force(catalog):
    store, items, fused, rng = catalog
    by_id = {it.item_id: it.fused for it in items}
    for _ in range(5):
        q = vec(rng, FUSED_DIM)
        assert_matches(store.search(q, 10), brute_force(fused, items, q, 10), by_id)
    q = vec(rng, FUSED_DIM)
    assert_matches(store.search(q, 100), brute_force(fused, items, q, 100), by_id)
    assert store.search(q, 0) == []
    with pytest.raises(ValueError):
        store.search(vec(rng, FUSED_DIM + 1), 5)


FILTER_CASES = [
    ("eq-string", [FilterSpec("genre", equals="jazz")], lambda a: a.get("genre") == "jazz"),
    ("eq-int", [FilterSpec("year", equals=1975)], lambda a: a.get("year") == 1975),
    ("eq-float-int", [FilterSpec("year", equals=1975.0)], lambda a: a.get("year") == 1975),
    ("eq-bool-true", [FilterSpec("live", equals=True)], lambda a: a.get("live") is True),
    ("eq-bool-false", [FilterSpec("live", equals=False)], lambda a: a.get("live") is False),
    ("range-both", [FilterSpec("year", min=1970, max=1979)], lambda a: 1970 <= a["year"] <= 1979),
    ("range-min", [FilterSpec("rating", min=4.0)], lambda a: a.get("rating", -1) >= 4.0),
    ("range-max", [FilterSpec("rating", max=0.5)], lambda a: "rating" in a and a["rating"] <= 0.5),
    ("in-strings", [FilterSpec("genre", in_set=["rock", "folk"])], lambda a: a["genre"] in ("rock", "folk")),
    ("in-numbers", [FilterSpec("year", in_set=[1961, 1999.0, 2100])], lambda a: a["year"] in (1961, 1999)),
    (
        "in-mixed",
        [FilterSpec("genre", in_set=["pop", 3, True])],
        lambda a: a["genre"] == "pop",
    ),
    (
        "combined",
        [FilterSpec("genre", equals="rock"), FilterSpec("year", min=1980), FilterSpec("live", equals=False)],
        lambda a: a["genre"] == "rock" and a["year"] >= 1980 and a["live"] is False,
    ),
    ("missing-attr", [FilterSpec("nonexistent", equals="x")], lambda a: False),
]


@pytest.mark.parametrize("name,filters,pred", FILTER_CASES, ids=[c[0] for c in FILTER_CASES])
def test_search_filters_hold(catalog, name, filters, pred):
    store, items, fused, rng = catalog
    by_id = {it.item_id: it.fused for it in items}
    q = vec(rng, FUSED_DIM)
    got = store.search(q, 20, filters=filters)
    want = brute_force(fused, items, q, 20, keep=lambda it: pred(it.attributes))
    assert_matches(got, want, by_id)
    for c in got:
        assert pred(c.attributes), (name, c.attributes)
        assert c.attributes == next(it.attributes for it in items if it.item_id == c.item_id)


def test_empty_in_set_matches_nothing(catalog):
    store, _, _, rng = catalog
    assert store.search(vec(rng, FUSED_DIM), 5, filters=[FilterSpec("genre", in_set=[])]) == []


def test_exclude_ids_and_k(catalog):
    store, items, fused, rng = catalog
    by_id = {it.item_id: it.fused for it in items}
    q = vec(rng, FUSED_DIM)
    top = [c.item_id for c in store.search(q, 30)]
    exclude = set(top[:25]) | {"not-an-item", 'we"ird\'id\\', "", "x" * 300}
    got = store.search(q, 10, exclude_ids=exclude)
    assert not exclude & {c.item_id for c in got}
    assert_matches(got, brute_force(fused, items, q, 10, exclude=exclude), by_id)

    keep = lambda it: it.attributes["genre"] == "pop"  # noqa: E731
    pop_top = [c.item_id for c in store.search(q, 40, filters=[FilterSpec("genre", equals="pop")])]
    exclude = set(pop_top[:30])
    got = store.search(q, 10, filters=[FilterSpec("genre", equals="pop")], exclude_ids=exclude)
    assert len(got) == 10 and not exclude & {c.item_id for c in got}
    assert_matches(got, brute_force(fused, items, q, 10, keep=keep, exclude=exclude), by_id)

    # more than what is left: everything that is left, nothing excluded
    all_but_three = {it.item_id for it in items[3:]}
    got = store.search(q, 50, exclude_ids=all_but_three)
    assert sorted(c.item_id for c in got) == sorted(it.item_id for it in items[:3])


NASTY = [
    'rock" or attr_genre != "',
    "rock' or attr_genre != '",
    "back\\slash",
    'ends with backslash\\',
    'quote"and\\"escaped',
    "it's",
    "new\nline\ttab\rcr",
    "ünïcødé ✓",
    ") or (id != \"",
]


def test_filter_values_are_escaped(store: MilvusStore):
    rng = np.random.default_rng(5)
    items = [item(f"n{i}", rng, {"genre": v}) for i, v in enumerate(NASTY)]
    items.append(item("plain", rng, {"genre": "rock"}))
    store.upsert(items)
    q = vec(rng, FUSED_DIM)
    for i, value in enumerate(NASTY):
        got = store.search(q, 50, filters=[FilterSpec("genre", equals=value)])
        assert [c.item_id for c in got] == [f"n{i}"], value
        got = store.search(q, 50, filters=[FilterSpec("genre", in_set=[value, "nothing"])])
        assert [c.item_id for c in got] == [f"n{i}"], value
    # ids with quotes/backslashes round-trip through get / exclude / delete
    weird = ["id'quote", 'id"dq', "id\\bs", "id' or id != '"]
    store.upsert([item(w, rng) for w in weird])
    assert set(store.get(weird)) == set(weird)
    got = store.search(q, 100, exclude_ids=set(weird))
    assert not set(weird) & {c.item_id for c in got} and len(got) == len(items)
    assert store.delete(["id' or id != '"]) == ["id' or id != '"]
    assert store.count() == len(items) + 3


def test_quote_string_literal():
    assert quote_string('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    expr = build_filter([FilterSpec("genre", equals='x" or true or "')])
    assert expr == 'attr_genre == "x\\" or true or \\""'


@pytest.mark.parametrize(
    "name", ["bad-name", "1abc", "", "a" * 65, "genre\n", 'x"]', "g enre", "ключ", "a.b", None]
)
def test_invalid_attribute_names_rejected(catalog, name):
    store, _, _, rng = catalog
    with pytest.raises(ValueError, match="attribute name"):
        store.search(vec(rng, FUSED_DIM), 5, filters=[FilterSpec(name, equals="x")])


@pytest.mark.parametrize(
    "spec",
    [
        FilterSpec("year", equals=1, min=0),
        FilterSpec("year"),
        FilterSpec("year", min=float("nan")),
        FilterSpec("year", max=float("inf")),
        FilterSpec("year", min="1990"),
        FilterSpec("year", min=True),
        FilterSpec("genre", equals=["a"]),
        FilterSpec("genre", in_set=[None]),
    ],
)
def test_invalid_filter_specs_rejected(catalog, spec):
    store, _, _, rng = catalog
    with pytest.raises(ValueError):
        store.search(vec(rng, FUSED_DIM), 5, filters=[spec])

