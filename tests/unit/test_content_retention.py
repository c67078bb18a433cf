"""Content retention: the local content store, content hashes in the Milvus store, read-back via the engine."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from milvus_store_support import assert_same_item, item, make_schema  # noqa: E402

from fusionrec.core.errors import NotFound  # noqa: E402
from fusionrec.retrieval import content as content_module  # noqa: E402
from fusionrec.retrieval import item_collections  # noqa: E402
from fusionrec.retrieval.content import LocalContentStore, open_content_store  # noqa: E402
from fusionrec.retrieval.engine import RetrievalEngine  # noqa: E402
from fusionrec.retrieval.layout import F_CONTENT, modality_vectors_schema  # noqa: E402
from fusionrec.retrieval.milvus import MilvusStore  # noqa: E402

IMAGE_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- content store


def test_round_trip_keyed_by_hash(tmp_path: Path):
    store = LocalContentStore(tmp_path / "content")
    digest = store.put(IMAGE_BYTES)
    assert digest == sha(IMAGE_BYTES)
    assert store.path(digest) == (tmp_path / "content").resolve() / digest[:2] / digest
    assert store.get(digest) == IMAGE_BYTES and store.has(digest)
    assert store.put_many({"text": "un café ☕", "image": IMAGE_BYTES}) == {
        "text": sha("un café ☕".encode()), "image": digest}
    assert store.get(sha("un café ☕".encode())).decode("utf-8") == "un café ☕"


def test_put_is_idempotent(tmp_path: Path):
    store = LocalContentStore(tmp_path)
    first = store.put(IMAGE_BYTES)
    mtime = store.path(first).stat().st_mtime_ns
    assert store.put(bytearray(IMAGE_BYTES)) == first
    assert store.path(first).stat().st_mtime_ns == mtime  # not rewritten
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [first]


def test_missing_or_malformed_hashes(tmp_path: Path):
    store = LocalContentStore(tmp_path)
    with pytest.raises(NotFound):
        store.get(sha(b"never kept"))
    assert not store.has(sha(b"never kept"))
    for bad in ("../../etc/passwd", "ABC", sha(b"x").upper()):
        with pytest.raises(ValueError):
            store.get(bad)


def test_no_partial_file_is_ever_visible(tmp_path: Path, monkeypatch):
    """A write that dies midway leaves neither the final file nor a temporary one."""
    store = LocalContentStore(tmp_path)
    real_fsync = os.fsync

    def dying_fsync(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(content_module.os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="disk gone"):
        store.put(IMAGE_BYTES)
    assert not store.has(sha(IMAGE_BYTES))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(content_module.os, "fsync", real_fsync)
    assert store.get(store.put(IMAGE_BYTES)) == IMAGE_BYTES


def test_concurrent_writers_of_the_same_content(tmp_path: Path):
    store = LocalContentStore(tmp_path)
    data = os.urandom(1 << 20)
    seen: list[bytes] = []

    def write_then_read():
        seen.append(store.get(store.put(data)))

    threads = [threading.Thread(target=write_then_read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [data] * 8
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [sha(data)]


def test_open_content_store(tmp_path: Path):
    assert isinstance(open_content_store(f"file://{tmp_path}/c"), LocalContentStore)
    assert open_content_store(tmp_path / "d").root == (tmp_path / "d").resolve()
    with pytest.raises(ValueError, match="only local or shared folders"):
        open_content_store("s3://bucket/content")


# --------------------------------------------------------------------------- Milvus store


def test_store_keeps_content_hashes(tmp_path: Path):
    rng = np.random.default_rng(0)
    kept = item("a", rng)
    kept.content = {"text": sha(b"text"), "image": sha(IMAGE_BYTES)}
    bare = item("b", rng, modalities=("text",))
    path = str(tmp_path / "store.db")
    with MilvusStore(path, make_schema()) as store:
        store.upsert([kept, bare])
        got = store.get(["a", "b"])
        assert_same_item(got["a"], kept)
        assert got["a"].content == kept.content and got["b"].content == {}
        assert {i.item_id: i.content for batch in store.iter_items() for i in batch}["a"] == kept.content
        wrong = item("c", rng)
        wrong.content = {"text": "not-a-hash"}
        with pytest.raises(ValueError, match="sha256"):
            store.upsert([wrong])
        wrong.content = {"audio": sha(b"x")}
        with pytest.raises(ValueError, match="unknown modalities"):
            store.upsert([wrong])
    with MilvusStore(path, make_schema()) as store:  # reopened: still there
        assert store.get(["a"])["a"].content == kept.content


def _without_content_field(dims):
    schema, idx = modality_vectors_schema(dims)
    schema.fields[:] = [f for f in schema.fields if f.name != F_CONTENT]
    return schema, idx


def test_a_store_created_before_content_retention_opens_and_reads(tmp_path: Path, monkeypatch):
    rng = np.random.default_rng(1)
    path = str(tmp_path / "old.db")
    old = item("old", rng)
    with monkeypatch.context() as m:
        m.setattr(item_collections, "modality_vectors_schema", _without_content_field)
        with MilvusStore(path, make_schema()) as store:
            assert not store._rows.content_field
            store.upsert([old])
    with MilvusStore(path, make_schema()) as store:  # today's code on the old file
        assert_same_item(store.get(["old"])["old"], old)
        assert store.get(["old"])["old"].content == {}
        new = item("new", rng)
        new.content = {"text": sha(b"text")}
        store.upsert([new])  # written without hashes: the collection has no field for them
        assert store.get(["new"])["new"].content == {}
        assert store.count() == 2


# --------------------------------------------------------------------------- engine


@pytest.fixture
def engine(tmp_path: Path):
    eng = RetrievalEngine.open(str(tmp_path / "store.db"), make_schema(),
                               content=LocalContentStore(tmp_path / "content"))
    yield eng
    eng.close()


def test_engine_keeps_content_and_reads_it_back(engine: RetrievalEngine, tmp_path: Path):
    rng = np.random.default_rng(2)
    items = [item("a", rng), item("b", rng, modalities=("text",)), item("c", rng)]
    contents = [{"text": "a red bicycle", "image": IMAGE_BYTES}, {"text": "a red bicycle"}, {}]
    assert engine.upsert(items, contents) == 3
    got = engine.get(["a", "b", "c"])
    assert got["a"].content == {"text": sha(b"a red bicycle"), "image": sha(IMAGE_BYTES)}
    assert got["b"].content == {"text": sha(b"a red bicycle")}  # same text, one file
    assert got["c"].content == {}
    assert engine.read_content("a", "image") == IMAGE_BYTES
    assert engine.read_content("b", "text").decode("utf-8") == "a red bicycle"
    assert (tmp_path / "content" / sha(IMAGE_BYTES)[:2] / sha(IMAGE_BYTES)).read_bytes() == IMAGE_BYTES
    for item_id, modality in (("c", "text"), ("b", "image"), ("nope", "text")):
        with pytest.raises(NotFound):
            engine.read_content(item_id, modality)
    assert engine.delete(["a"]) == ["a"]
    assert engine.content.has(sha(IMAGE_BYTES))  # content is shared by hash: not deleted with the item
    with pytest.raises(ValueError, match="2 contents for 3 items"):
        engine.upsert(items, contents[:2])


def test_engine_without_a_content_store_keeps_nothing(tmp_path: Path):
    engine = RetrievalEngine.open(str(tmp_path / "store.db"), make_schema())
    try:
        engine.upsert([item("a", np.random.default_rng(3))], [{"text": "kept nowhere"}])
        assert engine.get(["a"])["a"].content == {}
        with pytest.raises(NotFound):
            engine.read_content("a", "text")
    finally:
        engine.close()
