"""Encoder swap in the retrieval engine, without Ray: shadow vectors beside the served ones, then one
atomic switch (retrieval/shadow.py, retrieval/swap.py), on a real Milvus Lite file."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fusionrec.core.errors import FailedPrecondition, InvalidArgument  # noqa: E402
from fusionrec.fusion.registry import get_fusion_model  # noqa: E402
from fusionrec.retrieval.base import InteractionEvent, StoredItem, StoreSchema  # noqa: E402
from fusionrec.retrieval.content import LocalContentStore  # noqa: E402
from fusionrec.retrieval.engine import RetrievalEngine  # noqa: E402
from fusionrec.retrieval.query import QueryContent, RecommendQuery  # noqa: E402

DIMS = {"text": 4, "image": 3}
OLD = {"text": "text-v1", "image": "image-v1"}
IDS = [f"i{k}" for k in range(8)]


def unit(rng, dim):
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def model():
    return get_fusion_model("weighted-v0", DIMS, block_dim=4)


@pytest.fixture(params=["memory", "milvus"])
def engine(request, tmp_path, model):
    schema = StoreSchema(dict(DIMS), model.dim, dict(OLD), model.version)
    eng = RetrievalEngine.open(str(tmp_path / "swap.db"), schema, search_backend=request.param,
                               content=LocalContentStore(tmp_path / "content"))
    rng = np.random.default_rng(0)
    vectors = [{m: unit(rng, d) for m, d in DIMS.items()} for _ in IDS]
    fused = model.item_vectors(vectors, IDS)
    items = [StoredItem(i, {}, v, f, dict(OLD), model.version) for i, v, f in zip(IDS, vectors, fused)]
    eng.upsert(items, [{"text": f"text of {i}", "image": f"png of {i}".encode()} for i in IDS])
    eng.record_interactions([InteractionEvent("u", "i0", "view", 1.0)])
    yield eng
    eng.close()


def test_shadow_vectors_wait_beside_the_served_ones_then_switch_atomically(engine, model):
    rng = np.random.default_rng(1)
    new = {i: unit(rng, 3) for i in IDS}
    status = engine.begin_swap("image", "image-v2", 3)
    assert (status["version"], status["items"], status["done"], status["resumed"]) == ("image-v2", 8, 0, False)
    todo = engine.swap_todo("image")
    assert sorted(todo) == IDS
    assert engine.read_digests([todo["i3"]]) == {todo["i3"]: b"png of i3"}  # the kept content, by digest
    engine.put_shadow("image", {i: new[i] for i in IDS[:5]})
    assert engine.begin_swap("image", "image-v2", 3)["resumed"] and engine.swap_status("image")["done"] == 5
    assert sorted(engine.swap_todo("image")) == IDS[5:]
    with pytest.raises(FailedPrecondition, match="3 items hold image vectors but no shadow vector yet"):
        engine.commit_swap("image", model)
    # Still serving the old space: an image query matching i3's old vector finds i3 first.
    old_i3 = engine.get(["i3"])["i3"].modality_vectors["image"]
    ask = RecommendQuery("", [], QueryContent(), 1, [], [])
    assert engine.recommend(ask, {"image": old_i3}, model, 10).candidates[0].item_id == "i3"
    engine.put_shadow("image", {i: new[i] for i in IDS[5:]})
    assert engine.commit_swap("image", model) == 8
    assert engine.schema.encoder_versions == {"text": "text-v1", "image": "image-v2"}
    got = engine.get(IDS)
    for i in IDS:
        np.testing.assert_allclose(got[i].modality_vectors["image"], new[i], rtol=1e-6)
        assert got[i].encoder_versions == {"text": "text-v1", "image": "image-v2"}
        expected = model.item_vectors([{"text": got[i].modality_vectors["text"], "image": new[i]}], [i])[0]
        np.testing.assert_allclose(got[i].fused, expected, rtol=1e-5, atol=1e-6)
    assert engine.recommend(ask, {"image": new["i6"]}, model, 10).candidates[0].item_id == "i6"
    assert engine.swap_status("image")["version"] is None  # shadow dropped
    assert engine.history_vectors("u", 10)[0] == ["i0"]  # interactions untouched


def test_a_swap_only_changes_that_modality_and_keeps_its_dim(engine, model):
    with pytest.raises(InvalidArgument, match="no 'audio' modality"):
        engine.begin_swap("audio", "audio-v2", 3)
    engine.begin_swap("image", "image-v2", 5)
    engine.put_shadow("image", {i: np.ones(5, np.float32) for i in IDS})
    with pytest.raises(InvalidArgument, match="a swap to another dim is not supported"):
        engine.commit_swap("image", model)
    engine.begin_swap("image", "image-v3", 3)  # another target: the old shadow is dropped
    assert engine.swap_status("image") | {"without_content": []} == {
        "modality": "image", "version": "image-v3", "items": 8, "done": 0, "without_content": []}


def test_a_swap_that_committed_before_a_crash_finishes_at_open(tmp_path, model):
    """Crash between the switch and the modality-rows rewrite: the next open finishes the rewrite."""
    from fusionrec.retrieval.milvus import MilvusStore
    from fusionrec.retrieval.swap import swapped

    schema = StoreSchema(dict(DIMS), model.dim, dict(OLD), model.version)
    rng = np.random.default_rng(2)
    store = MilvusStore(str(tmp_path / "crash.db"), schema)
    vectors = [{m: unit(rng, d) for m, d in DIMS.items()} for _ in IDS]
    store.upsert([StoredItem(i, {}, v, f, dict(OLD), model.version)
                  for i, v, f in zip(IDS, vectors, model.item_vectors(vectors, IDS))])
    shadow = store.shadow("image")
    shadow.begin("image-v2", 3)
    new = {i: unit(rng, 3) for i in IDS}
    shadow.put(new)
    new_schema = StoreSchema(dict(DIMS), model.dim, {"text": "text-v1", "image": "image-v2"}, model.version)
    fn = lambda batch: model.item_vectors([b.modality_vectors for b in batch], [b.item_id for b in batch])  # noqa
    with store._write_lock:  # steps 2-3 of commit_swap, then the "crash"
        store._rebuild(new_schema, swapped(store.iter_items(), "image", shadow, "image-v2"), fn)
        shadow.mark_committed()
    assert store.get(["i1"])["i1"].encoder_versions["image"] == "image-v1"  # rows not rewritten yet
    store.close()
    reopened = MilvusStore(str(tmp_path / "crash.db"), new_schema)
    got = reopened.get(IDS)
    assert all(got[i].encoder_versions["image"] == "image-v2" for i in IDS)
    np.testing.assert_allclose(got["i1"].modality_vectors["image"], new["i1"], rtol=1e-6)
    assert reopened.shadow("image").state() is None
    reopened.close()


def _completes_while(held, call) -> None:
    """``call()`` finishes in a thread of its own while this thread holds lock ``held`` (a bookkeeping
    call waiting on that lock would never finish: the join gives up, and the test fails)."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # re-raised below, in the test's thread
            errors.append(err)

    with held:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), f"{call} waited for a lock it must not take"
    if errors:
        raise errors[0]


def test_swap_bookkeeping_and_recommend_do_not_wait_for_each_other(engine, model):
    """A swap's shadow work (create, scans, writes) stays off the engine lock Recommend takes, and
    Recommend stays off the store's write lock the shadow work takes (`fusionrec bench swap`: 1 s stalls)."""
    rng = np.random.default_rng(3)
    _completes_while(engine._lock, lambda: engine.begin_swap("image", "image-v2", 3))
    _completes_while(engine._lock, lambda: engine.put_shadow("image", {i: unit(rng, 3) for i in IDS[:4]}))
    _completes_while(engine._lock, lambda: engine.swaps() == {"image": "image-v2"} or pytest.fail("swaps"))
    _completes_while(engine._lock, lambda: sorted(engine.swap_todo("image")) == IDS[4:] or pytest.fail("todo"))
    ask = RecommendQuery("u", [], QueryContent(), 3, [], [])
    _completes_while(engine.store._write_lock, lambda: len(engine.recommend(ask, {}, model, 10).candidates) == 3
                     or pytest.fail("recommend"))
