"""MilvusStore search backends (memory vs Milvus), re-indexing and the flush policy (real Milvus Lite)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fusionrec.retrieval.base import FilterSpec, SchemaMismatch, StoredItem  # noqa: E402
from fusionrec.retrieval.milvus import MilvusStore  # noqa: E402
from milvus_store_support import DIMS, FUSED_DIM, GENRES, assert_same_item, ev, item, make_schema, vec  # noqa: E402
from milvus_store_support import backend, db_path  # noqa: E402,F401 (fixtures)


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


def test_search_hits_are_the_search_as_arrays(db_path: str):
    """search_hits (the ranking stage's input, arrays without Candidates) holds what search returns, on
    both backends, filters and exclusions included."""
    rng = np.random.default_rng(13)
    items = [item(f"a{i}", rng, {"genre": GENRES[i % 4]}) for i in range(40)]
    mem = MilvusStore(db_path, make_schema(), search_backend="memory")
    mem.upsert(items)
    mil = MilvusStore(db_path, make_schema(), search_backend="milvus", interactions_collection="i2")
    try:
        q = vec(rng, FUSED_DIM)
        for store in (mem, mil):
            for filters, exclude in ((None, set()), ([FilterSpec("genre", equals=GENRES[1])], {"a1", "a5"})):
                want = store.search(q, 12, filters, exclude)
                hits = store.search_hits(q, 12, filters, exclude)
                assert hits.item_ids == [c.item_id for c in want] and len(hits) == len(want)
                assert hits.fused.shape == (len(want), FUSED_DIM) and hits.fused.dtype == np.float32
                np.testing.assert_allclose(hits.scores, [c.score for c in want], rtol=1e-5)
                np.testing.assert_allclose(hits.fused, np.stack([c.fused for c in want]), rtol=1e-6)
                assert hits.attributes == [c.attributes for c in want]
                assert [c.item_id for c in hits.candidates([2, 0])] == [want[2].item_id, want[0].item_id]
            assert len(store.search_hits(q, 5, [FilterSpec("genre", equals="no-such-genre")], set())) == 0
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
    with pytest.raises(SchemaMismatch, match="model version 'fusion-1'"):
        s.upsert([items[0]])  # the old model's vectors are refused now (a caller re-fuses on this)
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
        names = s2._conn.client.list_collections()
        assert "items" not in names and "items__r1" not in names and "items__r2" in names
    finally:
        s2.close()


def test_reindex_of_an_empty_store_keeps_the_memory_backend(db_path: str):
    rng = np.random.default_rng(14)
    s = MilvusStore(db_path, make_schema(), search_backend="memory")
    try:
        assert s.reindex(make_schema(fused_dim=8, model_version="fusion-2"), lambda b: np.zeros((len(b), 8))) == 0
        assert s._mirror is not None and s._mirror.dim == 8
        it = item("later", rng, fused=vec(rng, 8))
        s.upsert([StoredItem(it.item_id, {}, it.modality_vectors, it.fused, it.encoder_versions, "fusion-2")])
        assert len(s._mirror) == 1 and [c.item_id for c in s.search(vec(rng, 8), 3)] == ["later"]
    finally:
        s.close()


@pytest.mark.parametrize("search_backend, every", [("memory", 8192), ("milvus", 512)])
def test_lite_flush_policy_follows_who_serves_searches(db_path: str, search_backend: str, every: int):
    """Lite's own search scans unflushed rows; with the in-memory index only reads by id hit Lite."""
    s = MilvusStore(db_path, make_schema(), search_backend=search_backend)
    try:
        assert s._conn.flush_every == every
    finally:
        s.close()
