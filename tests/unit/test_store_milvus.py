"""MilvusStore against a real Milvus Lite data dir (no mocks)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fusionrec.retrieval.base import (  # noqa: E402
    FilterSpec,
    InteractionEvent,
    SchemaMismatch,
    StoredItem,
    StoreSchema,
)
from fusionrec.retrieval.expressions import build_filter, quote_string  # noqa: E402
from fusionrec.retrieval.milvus import MilvusStore  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FUSED_DIM = 16
DIMS = {"text": 8, "image": 6}
GENRES = ["rock", "pop", "jazz", "folk"]


def make_schema(**changes) -> StoreSchema:
    base = dict(
        modality_dims=dict(DIMS),
        fused_dim=FUSED_DIM,
        encoder_versions={"text": "minilm-v1", "image": "effnet-v1"},
        model_version="fusion-1",
    )
    base.update(changes)
    return StoreSchema(**base)


def vec(rng: np.random.Generator, dim: int) -> np.ndarray:
    return rng.standard_normal(dim).astype(np.float32)


def item(item_id: str, rng: np.random.Generator, attrs=None, modalities=("text", "image"), fused=None):
    return StoredItem(
        item_id=item_id,
        attributes=dict(attrs or {}),
        modality_vectors={m: vec(rng, DIMS[m]) for m in modalities},
        fused=vec(rng, FUSED_DIM) if fused is None else fused,
        encoder_versions={m: make_schema().encoder_versions[m] for m in modalities},
        model_version="fusion-1",
    )


def assert_same_item(got: StoredItem, want: StoredItem) -> None:
    assert got.item_id == want.item_id
    assert got.attributes == want.attributes
    for k, v in want.attributes.items():
        assert type(got.attributes[k]) is type(v), k
    assert set(got.modality_vectors) == set(want.modality_vectors)
    for m, v in want.modality_vectors.items():
        assert got.modality_vectors[m].dtype == np.float32
        np.testing.assert_array_equal(got.modality_vectors[m], v)
    assert got.fused.dtype == np.float32
    np.testing.assert_array_equal(got.fused, want.fused)
    assert got.encoder_versions == want.encoder_versions
    assert got.model_version == want.model_version


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "store.db")


BACKENDS = ["memory", "milvus"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store(db_path: str, backend: str):
    s = MilvusStore(db_path, make_schema(), search_backend=backend)
    yield s
    s.close()


# --------------------------------------------------------------------------- catalog

N_ITEMS = 500


@pytest.fixture(scope="module", params=BACKENDS)
def catalog(tmp_path_factory, request):
    """500 clustered items with attributes, in one store per search backend."""
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((10, FUSED_DIM)).astype(np.float32) * 3
    fused = (centers[rng.integers(0, 10, N_ITEMS)] + rng.standard_normal((N_ITEMS, FUSED_DIM))).astype(
        np.float32
    )
    items = []
    for i in range(N_ITEMS):
        attrs = {
            "genre": GENRES[i % 4],
            "year": 1960 + (i % 60),
            "rating": round(float(rng.uniform(0, 5)), 3),
            "live": i % 3 == 0,
        }
        if i % 10 == 0:
            del attrs["rating"]  # some items lack an attribute
        items.append(item(f"item-{i}", rng, attrs, fused=fused[i]))
    path = str(tmp_path_factory.mktemp("catalog") / "catalog.db")
    s = MilvusStore(path, make_schema(), search_backend=request.param)
    s.upsert(items)
    yield s, items, fused, rng
    s.close()


def brute_force(fused, items, q, k, keep=lambda it: True, exclude=()):
    scores = fused @ q
    order = [i for i in np.argsort(-scores) if keep(items[i]) and items[i].item_id not in exclude]
    return [(items[i].item_id, float(scores[i])) for i in order[:k]]


def assert_matches(got, want, fused_by_id):
    assert len(got) == len(want)
    scores = [c.score for c in got]
    assert scores == sorted(scores, reverse=True)
    # the returned items' true scores equal the brute-force top-k scores (robust to near ties)
    np.testing.assert_allclose(scores, [s for _, s in want], rtol=1e-5, atol=1e-4)
    assert [c.item_id for c in got] == [i for i, _ in want]
    for c in got:
        np.testing.assert_array_equal(c.fused, fused_by_id[c.item_id])


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


# --------------------------------------------------------------------------- interactions


def ev(user, item_id, ts, kind="click"):
    return InteractionEvent(user_id=user, item_id=item_id, kind=kind, timestamp_s=ts)


def test_history_order_and_limit(store: MilvusStore):
    store.record_interactions([ev("u1", "a", 30.0), ev("u2", "z", 5.0), ev("u1", "b", 10.0)])
    store.record_interactions([ev("u1", "c", 20.0, "play"), ev("u1", "d", 40.0)])
    assert [e.item_id for e in store.history("u1", 10)] == ["b", "c", "a", "d"]
    assert [e.item_id for e in store.history("u1", 2)] == ["a", "d"]
    assert store.history("u1", 4)[1] == ev("u1", "c", 20.0, "play")
    assert [e.item_id for e in store.history("u2", 5)] == ["z"]
    assert store.history("nobody", 5) == []
    assert store.history("u1", 0) == []
    store.record_interactions([])


def test_history_beyond_cache_bounds(db_path: str):
    s = MilvusStore(db_path, make_schema(), history_cache_users=2, history_cache_events_per_user=2)
    try:
        s.record_interactions([ev(f"u{u}", f"i{i}", float(10 * u + i)) for u in range(4) for i in range(5)])
        for u in range(4):  # evicted users and truncated lists are read back from Milvus
            assert [e.item_id for e in s.history(f"u{u}", 10)] == [f"i{i}" for i in range(5)]
            assert [e.item_id for e in s.history(f"u{u}", 2)] == ["i3", "i4"]
        s.record_interactions([ev("u0", "late", 1000.0)])
        assert [e.item_id for e in s.history("u0", 3)] == ["i3", "i4", "late"]
        assert s.history("never", 3) == []
    finally:
        s.close()


# --------------------------------------------------------------------------- durability


@pytest.mark.parametrize("flush_every_rows", [0, 1], ids=["wal-only", "flush-every-write"])
def test_reopen_after_close_keeps_everything(db_path: str, flush_every_rows: int, backend: str):
    rng = np.random.default_rng(6)
    items = [item(f"r{i}", rng, {"genre": GENRES[i % 4], "year": 2000 + i}) for i in range(20)]
    s = MilvusStore(db_path, make_schema(), flush_every_rows=flush_every_rows, search_backend=backend)
    s.upsert(items)
    s.delete(["r0"])
    s.record_interactions([ev("u", "r1", 1.0), ev("u", "r2", 2.0)])
    q = vec(rng, FUSED_DIM)
    before = [(c.item_id, c.score) for c in s.search(q, 5, filters=[FilterSpec("genre", equals="pop")])]
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.count()

    s2 = MilvusStore(db_path, make_schema(), search_backend=backend)  # memory: rebuilt from Milvus
    try:
        assert s2.count() == 19
        got = s2.get([it.item_id for it in items])
        assert "r0" not in got
        for it in items[1:]:
            assert_same_item(got[it.item_id], it)
        assert [e.item_id for e in s2.history("u", 10)] == ["r1", "r2"]
        after = [(c.item_id, c.score) for c in s2.search(q, 5, filters=[FilterSpec("genre", equals="pop")])]
        assert after == before
        s2.record_interactions([ev("u", "r3", 3.0)])
    finally:
        s2.close()
    s3 = MilvusStore(db_path, make_schema())
    try:
        assert [e.item_id for e in s3.history("u", 10)] == ["r1", "r2", "r3"]
    finally:
        s3.close()


def test_two_stores_on_one_file_in_one_process(db_path: str):
    rng = np.random.default_rng(8)
    a = MilvusStore(db_path, make_schema())
    b = MilvusStore(db_path, make_schema(), interactions_collection="interactions_b")
    a.upsert([item("shared", rng)])
    a.close()  # must not pull the Lite server from under b
    assert set(b.get(["shared"])) == {"shared"}
    b.close()


def test_durable_without_close_after_process_dies(tmp_path: Path):
    """Writes survive a hard exit (no close, no flush): Lite replays its WAL on open."""
    db = str(tmp_path / "crash.db")
    code = textwrap.dedent(
        f"""
        import os, sys, numpy as np
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store_milvus import make_schema, item, ev
        from fusionrec.retrieval.milvus import MilvusStore
        s = MilvusStore({db!r}, make_schema(), flush_every_rows=0)
        rng = np.random.default_rng(0)
        s.upsert([item("k" + str(i), rng, {{"n": i}}) for i in range(5)])
        s.delete(["k4"])
        s.record_interactions([ev("u", "k1", 1.0)])
        os._exit(0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = MilvusStore(db, make_schema())
    try:
        assert sorted(s.get([f"k{i}" for i in range(5)])) == ["k0", "k1", "k2", "k3"]
        assert [e.item_id for e in s.history("u", 5)] == ["k1"]
    finally:
        s.close()


# --------------------------------------------------------------------------- schema


def test_schema_mismatch_is_refused_with_advice(db_path: str):
    s = MilvusStore(db_path, make_schema())
    s.upsert([item("a", np.random.default_rng(9))])
    s.close()

    changed = make_schema(encoder_versions={"text": "minilm-v2", "image": "effnet-v1"})
    with pytest.raises(SchemaMismatch) as err:
        MilvusStore(db_path, changed)
    msg = str(err.value)
    assert "'text'" in msg and "'minilm-v1'" in msg and "'minilm-v2'" in msg
    assert "image" not in msg.split("Mixing")[0]  # only the differing modality is named
    assert "items_collection" in msg and "re-ingest" in msg

    with pytest.raises(SchemaMismatch, match=r"'image': stored dim 6, configured dim 7"):
        MilvusStore(db_path, make_schema(modality_dims={"text": 8, "image": 7}))
    with pytest.raises(SchemaMismatch, match="'audio' is configured but not in the stored data"):
        MilvusStore(
            db_path,
            make_schema(
                modality_dims={**DIMS, "audio": 4},
                encoder_versions={"text": "minilm-v1", "image": "effnet-v1", "audio": "mfcc"},
            ),
        )
    with pytest.raises(SchemaMismatch, match="fusion-2"):
        MilvusStore(db_path, make_schema(model_version="fusion-2"))
    with pytest.raises(SchemaMismatch, match="fused vectors: stored dim 16"):
        MilvusStore(db_path, make_schema(fused_dim=32))

    # a failed open leaves the file usable; another collection name takes the new schema
    other = MilvusStore(db_path, changed, items_collection="items_v2")
    try:
        assert other.count() == 0
        other_item = item("b", np.random.default_rng(10), modalities=("image",))
        other.upsert([other_item])
    finally:
        other.close()
    same = MilvusStore(db_path, make_schema())
    try:
        assert same.count() == 1 and set(same.get(["a"])) == {"a"}
    finally:
        same.close()


def test_foreign_collection_is_refused(db_path: str):
    s = MilvusStore(db_path, make_schema())
    s.close()
    with pytest.raises(SchemaMismatch, match="not a fusionrec items collection"):
        MilvusStore(db_path, make_schema(), items_collection="interactions", interactions_collection="x")


def test_bad_names_rejected(db_path: str):
    with pytest.raises(ValueError):
        MilvusStore(db_path, make_schema(), items_collection="bad-name")
    with pytest.raises(ValueError):
        MilvusStore(db_path, make_schema(modality_dims={"te xt": 4}, encoder_versions={}))


# --------------------------------------------------------------------------- search backends

MIXED = {"s1": "1", "i1": 1, "t": True, "f1": 1.0, "f15": 1.5, "fa": False, "i0": 0,
         "big": 2**60 + 1, "bigf": float(2**60), "neg": -3, "txt": "rock"}
MIXED_FILTERS = [
    FilterSpec("x", equals=1), FilterSpec("x", equals=True), FilterSpec("x", equals=False),
    FilterSpec("x", equals="1"), FilterSpec("x", equals=0), FilterSpec("x", equals=1.5),
    FilterSpec("x", equals=2**60 + 1), FilterSpec("x", equals=float(2**60)), FilterSpec("x", equals=2**60),
    FilterSpec("x", min=1), FilterSpec("x", max=0.5), FilterSpec("x", min=-3, max=1),
    FilterSpec("x", min=2**60 + 1), FilterSpec("x", max=2**60), FilterSpec("x", min=0.5, max=0.4),
    FilterSpec("x", in_set=[1]), FilterSpec("x", in_set=[True]), FilterSpec("x", in_set=["1", "rock"]),
    FilterSpec("x", in_set=[2**60 + 1, -3]), FilterSpec("x", in_set=["rock", 0, False]),
    FilterSpec("z", equals=True), FilterSpec("z", min=0.5), FilterSpec("zb", equals=1),
    FilterSpec("zb", min=1), FilterSpec("zb", in_set=[1]), FilterSpec("missing", min=0),
]


def test_backends_agree_on_mixed_value_types(db_path: str):
    """Memory filters follow Milvus' own comparison rules (true == 1, "1" != 1, exact big ints)."""
    rng = np.random.default_rng(11)
    items = [item(k, rng, {"x": v}) for k, v in MIXED.items()]
    items += [item(f"h{i}", rng, {"z": i}) for i in range(3)]
    items += [item("hb", rng, {"zb": True}), item("hb2", rng, {"zb": False}), item("none", rng, {})]
    mem = MilvusStore(db_path, make_schema(), search_backend="memory")
    mem.upsert(items)
    mil = MilvusStore(db_path, make_schema(), search_backend="milvus", interactions_collection="i2")
    try:
        q = vec(rng, FUSED_DIM)
        for spec in MIXED_FILTERS:
            want = [(c.item_id, c.attributes) for c in mil.search(q, 50, filters=[spec])]
            got = [(c.item_id, c.attributes) for c in mem.search(q, 50, filters=[spec])]
            assert got == want, spec
        assert {c.item_id for c in mem.search(q, 50, filters=[FilterSpec("x", equals=1)])} == {"i1", "t", "f1"}
    finally:
        mem.close()
        mil.close()


def test_memory_backend_tracks_writes(db_path: str):
    rng = np.random.default_rng(12)
    mem = MilvusStore(db_path, make_schema(), search_backend="memory")
    mil = MilvusStore(db_path, make_schema(), search_backend="milvus", interactions_collection="i2")
    try:
        items = [item(f"w{i}", rng, {"genre": GENRES[i % 4], "n": i}) for i in range(60)]
        mem.upsert(items)
        same_vec = item("w1", rng, {"genre": "jazz"}, fused=items[1].fused)  # attribute-only change
        new_vec = item("w2", rng, {"genre": "rock", "n": 99})  # new vector
        mem.upsert([same_vec, new_vec])
        mem.delete(["w3", "w4", "nope"])
        mem.upsert([item("w4", rng, {"genre": "folk"})])  # deleted, then back
        q = vec(rng, FUSED_DIM)
        for filters in (None, [FilterSpec("genre", equals="jazz")], [FilterSpec("n", min=50)],
                        [FilterSpec("genre", in_set=["rock", "folk"])]):
            for exclude in (None, {"w0", "w2", "w5"}):
                want = [(c.item_id, round(c.score, 4), c.attributes) for c in mil.search(q, 70, filters, exclude)]
                got = [(c.item_id, round(c.score, 4), c.attributes) for c in mem.search(q, 70, filters, exclude)]
                assert got == want, (filters, exclude)
        hit = {c.item_id: c for c in mem.search(new_vec.fused, 70)}
        np.testing.assert_array_equal(hit["w2"].fused, new_vec.fused)
        assert "w3" not in hit and hit["w1"].attributes == {"genre": "jazz"}
        assert mem.memory_bytes() > 0 and mil.memory_bytes() == 0
    finally:
        mem.close()
        mil.close()


def test_search_backend_is_checked(db_path: str):
    with pytest.raises(ValueError, match="search_backend"):
        MilvusStore(db_path, make_schema(), search_backend="faiss")


# --------------------------------------------------------------------------- re-indexing


def test_reindex_switches_fused_vectors_atomically(db_path: str, backend: str):
    rng = np.random.default_rng(13)
    items = [item(f"x{i}", rng, {"genre": GENRES[i % 4]}, modalities=("text",) if i % 2 else ("text", "image"))
             for i in range(40)]
    s = MilvusStore(db_path, make_schema(), search_backend=backend)
    s.upsert(items)
    s.record_interactions([ev("u", "x1", 1.0)])
    new_schema = make_schema(fused_dim=8, model_version="fusion-2")
    proj = rng.standard_normal((DIMS["text"], 8)).astype(np.float32)

    def tower(batch):
        return np.stack([it.modality_vectors["text"] @ proj for it in batch])

    with pytest.raises(ValueError, match="modality"):
        s.reindex(make_schema(modality_dims={"text": 8, "image": 7}), tower)
    with pytest.raises(ValueError, match="shape"):
        s.reindex(new_schema, lambda b: np.zeros((len(b), 3), np.float32))
    assert s.count() == 40 and s.schema.model_version == "fusion-1"  # a failed reindex changes nothing

    assert s.reindex(new_schema, tower, batch_size=7) == 40
    want = {it.item_id: it.modality_vectors["text"] @ proj for it in items}
    q = vec(rng, 8)
    hits = s.search(q, 5, filters=[FilterSpec("genre", equals="pop")])
    ranked = sorted((float(v @ q), k) for k, v in want.items() if items[int(k[1:])].attributes["genre"] == "pop")
    assert [h.item_id for h in hits] == [k for _, k in reversed(ranked)][:5]
    got = s.get(["x0", "x1"])
    assert got["x0"].model_version == "fusion-2" and got["x0"].fused.shape == (8,)
    assert_same_item(got["x1"], StoredItem("x1", items[1].attributes, items[1].modality_vectors,
                                           want["x1"].astype(np.float32), items[1].encoder_versions, "fusion-2"))
    with pytest.raises(ValueError, match="expected shape"):
        s.upsert([items[0]])  # the old model's vectors are refused now
    s.upsert([StoredItem("x0", {"genre": "rock"}, items[0].modality_vectors, want["x0"].astype(np.float32),
                         items[0].encoder_versions, "fusion-2")])
    s.reindex(make_schema(fused_dim=8, model_version="fusion-3"), tower)  # and again
    s.close()

    with pytest.raises(SchemaMismatch, match="reindex"):
        MilvusStore(db_path, make_schema())  # the old configuration no longer opens
    s2 = MilvusStore(db_path, make_schema(fused_dim=8, model_version="fusion-3"), search_backend=backend)
    try:
        assert s2.count() == 40 and [e.item_id for e in s2.history("u", 5)] == ["x1"]
        assert [h.item_id for h in s2.search(q, 5, filters=[FilterSpec("genre", equals="pop")])] == [h.item_id for h in hits]
        names = s2._c.list_collections()
        assert "items" not in names and "items__r1" not in names and "items__r2" in names
    finally:
        s2.close()


@pytest.mark.parametrize("search_backend, every", [("memory", 8192), ("milvus", 512)])
def test_lite_flush_policy_follows_who_serves_searches(db_path: str, search_backend: str, every: int):
    """Lite's own search scans unflushed rows; with the in-memory index only reads by id hit Lite."""
    s = MilvusStore(db_path, make_schema(), search_backend=search_backend)
    try:
        assert s._flush_every == every
    finally:
        s.close()
