"""MilvusStore interactions, durability across close and crash, and schema checks (real Milvus Lite)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fusionrec.retrieval.base import FilterSpec, SchemaMismatch  # noqa: E402
from fusionrec.retrieval.milvus import MilvusStore  # noqa: E402
from milvus_store_support import DIMS, FUSED_DIM, GENRES, assert_same_item, ev, item, make_schema, vec  # noqa: E402
from milvus_store_support import backend, db_path, store  # noqa: E402,F401 (fixtures)


# --------------------------------------------------------------------------- interactions



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
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from milvus_store_support import make_schema, item, ev
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

