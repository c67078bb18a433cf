"""MilvusStore on a real Milvus server (milvus-server 2.3.5, started here): several stores — Retrieval replicas
without Ray — share one store. Writes, deletes and history through one are seen by the others at once, a
re-index through one switches all of them (the alias), and writes racing a re-index are never lost."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("pymilvus")

from fusionrec.core.errors import Unavailable  # noqa: E402
from fusionrec.fusion.weighted import WeightedBlockFusion  # noqa: E402
from fusionrec.retrieval.base import FilterSpec, InteractionEvent, SchemaMismatch, StoreSwitched  # noqa: E402
from fusionrec.retrieval.engine import RetrievalEngine  # noqa: E402
from fusionrec.retrieval.layout import marker_schema  # noqa: E402
from fusionrec.retrieval.milvus import MilvusStore  # noqa: E402
from fusionrec.retrieval.query import QueryContent, RecommendQuery  # noqa: E402
from fusionrec.retrieval.server_items import ServerOptions  # noqa: E402
from fusionrec.retrieval.server_lock import PROP_BEAT, PROP_LOCK  # noqa: E402
from milvus_server_support import MilvusServer  # noqa: E402
from milvus_store_support import FUSED_DIM, assert_same_item, ev, item, make_schema, vec  # noqa: E402
from test_store_milvus_backends import MIXED, MIXED_FILTERS  # noqa: E402

FAST = ServerOptions(state_ttl_s=0.2, retire_grace_s=0.5, popularity_ttl_s=0.0, lock_lease_s=3.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MilvusServer(tmp_path_factory.mktemp("milvus-server")) as srv:
        yield srv


@pytest.fixture
def pair(server, request):
    """Two stores over the same server collections (two replicas), fresh collections per test."""
    name = "t_" + request.node.name.split("[")[0].removeprefix("test_")[:40]
    kw = dict(items_collection=name, interactions_collection=name + "_events", server=FAST)
    a = MilvusStore(server.uri, make_schema(), **kw)
    b = MilvusStore(server.uri, make_schema(), **kw)
    yield a, b
    a.close()
    b.close()


def fuse_to(dim: int):
    """A re-index fn: deterministic new fused vectors of ``dim`` from the modality vectors."""
    def fn(batch):
        return np.stack([np.resize(np.concatenate([it.modality_vectors[m] for m in sorted(it.modality_vectors)]), dim)
                         for it in batch]).astype(np.float32)
    return fn


def test_writes_through_one_store_are_read_through_the_other(pair):
    a, b = pair
    rng = np.random.default_rng(1)
    items = [item(f"i{i}", rng, {"genre": ["rock", "pop"][i % 2], "year": 1990 + i}) for i in range(30)]
    a.upsert(items)
    got = b.get([it.item_id for it in items])
    for it in items:
        assert_same_item(got[it.item_id], it)
    assert b.count() == 30
    hits = b.search(items[3].fused, 5, [FilterSpec("genre", equals="pop")])
    assert hits and all(h.attributes["genre"] == "pop" for h in hits)
    assert hits[0].item_id == "i3"
    # replacing an item that loses a modality and an attribute: the other store sees exactly the new item
    text_only = item("i3", rng, {"genre": "rock"}, modalities=("text",))
    b.upsert([text_only])
    assert_same_item(a.get(["i3"])["i3"], text_only)
    assert a.search(text_only.fused, 1)[0].item_id == "i3"


def test_deletes_hold_everywhere(pair):
    a, b = pair
    rng = np.random.default_rng(2)
    items = [item(f"d{i}", rng, {"genre": "rock"}) for i in range(10)]
    a.upsert(items)
    assert b.delete(["d0", "d1", "nope"]) == ["d0", "d1"]
    for store in (a, b):
        assert store.get(["d0", "d1"]) == {}
        assert store.count() == 8
        found = {h.item_id for h in store.search(items[0].fused, 10)}
        assert found == {f"d{i}" for i in range(2, 10)}
        assert store.known(["d0", "d2"]) == {"d2"}


def test_history_and_popularity_are_shared(pair):
    a, b = pair
    rng = np.random.default_rng(3)
    a.upsert([item(f"h{i}", rng) for i in range(5)])
    a.record_interactions([ev("u1", "h1", 1.0), ev("u1", "h2", 2.0), ev("u2", "h2", 3.0)])
    assert [e.item_id for e in b.history("u1", 10)] == ["h1", "h2"]
    assert [e.item_id for e in b.history("u1", 1)] == ["h2"]
    assert b.history("nobody", 10) == []
    assert b.popularity() == [("h2", 2), ("h1", 1)]  # popularity_ttl_s=0: recounted from the server
    b.record_interactions([ev("u1", "h3", 4.0)])
    assert [e.item_id for e in a.history("u1", 10)] == ["h1", "h2", "h3"]


def test_an_event_id_is_stored_once_across_replicas_even_when_they_race(pair):
    a, b = pair
    a.upsert([item(f"k{i}", np.random.default_rng(8)) for i in range(3)])
    keyed = [InteractionEvent("u1", "k1", "click", 1.0, event_id="e1"),
             InteractionEvent("u1", "k2", "click", 2.0, event_id="e2")]
    assert a.record_interactions(keyed) == 2
    assert b.record_interactions(keyed) == 0  # a retry that reached the other replica
    racing = [InteractionEvent("u1", "k0", "click", 3.0, event_id=f"r{n}") for n in range(20)]
    threads = [threading.Thread(target=s.record_interactions, args=(racing,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = a.history("u1", 100)
    assert [e.event_id for e in history] == ["e1", "e2"] + [f"r{n}" for n in range(20)]
    assert b.popularity() == [("k0", 20), ("k1", 1), ("k2", 1)]


def test_engine_recommends_a_user_recorded_through_the_other_store(pair):
    a, b = pair
    model = WeightedBlockFusion(make_schema().modality_dims, block_dim=8)
    schema = make_schema(fused_dim=model.dim, model_version=model.version)
    for s in (a, b):  # both follow the configured model (the first re-indexes, the second finds it done)
        s.reindex(schema, lambda batch: model.item_vectors([it.modality_vectors for it in batch]))
    ea, eb = RetrievalEngine(a), RetrievalEngine(b)
    rng = np.random.default_rng(4)
    items = [item(f"r{i}", rng, {"genre": ["rock", "pop"][i % 2]}) for i in range(20)]
    fused = model.item_vectors([it.modality_vectors for it in items])
    for it, f in zip(items, fused):
        it.fused, it.model_version = f, model.version
    ea.upsert(items)
    ea.record_interactions([ev("u9", "r1", 1.0), ev("u9", "r3", 2.0)])
    q = RecommendQuery(user_id="u9", history_item_ids=[], query=QueryContent(), k=5, filters=[], exclude_item_ids=[])
    ranked = eb.recommend(q, {}, model, history_limit=50)
    assert ranked is not None and ranked.used_history
    ids = [c.item_id for c in ranked.candidates]
    assert len(ids) == 5 and not {"r1", "r3"} & set(ids)  # seen items left out
    ea.delete([ids[0]])
    assert ids[0] not in [c.item_id for c in eb.recommend(q, {}, model, history_limit=50).candidates]


def test_filters_mean_what_they_mean_on_lite(server, tmp_path):
    """The server compares bools only with bools and refuses mixed int/float lists; the store's
    clauses make it answer as Milvus Lite (and the in-memory index) do. One difference is left:
    a range bound beyond 2**53 meets a float of another magnitude in double precision."""
    rng = np.random.default_rng(11)
    items = [item(k, rng, {"x": v}) for k, v in MIXED.items()]
    items += [item(f"h{i}", rng, {"z": i}) for i in range(3)]
    items += [item("hb", rng, {"zb": True}), item("hb2", rng, {"zb": False}), item("none", rng, {})]
    lite = MilvusStore(str(tmp_path / "lite.db"), make_schema(), search_backend="memory")
    srv = MilvusStore(server.uri, make_schema(), items_collection="t_filters", interactions_collection="t_filters_ev")
    try:
        lite.upsert(items)
        srv.upsert(items)
        q = vec(rng, FUSED_DIM)
        specs = MIXED_FILTERS + [FilterSpec("x", in_set=[1, 1.5, "rock"]), FilterSpec("x", in_set=[0.0, 2**60 + 1])]
        for spec in specs:
            want = {c.item_id for c in lite.search(q, 50, filters=[spec])}
            got = {c.item_id for c in srv.search(q, 50, filters=[spec])}
            if spec.equals is None and spec.in_set is None and max(abs(spec.min or 0), abs(spec.max or 0)) > 2**53:
                assert got - want <= {"bigf"} and want - got <= {"bigf"}, spec  # 2.0**60 vs 2**60 + 1
                continue
            assert got == want, spec
        excluded = srv.search(q, 50, filters=[FilterSpec("x", equals=1)], exclude_ids={"t"}, only_ids={"i1", "t", "s1"})
        assert [c.item_id for c in excluded] == ["i1"]
    finally:
        lite.close()
        srv.close()


def test_reindex_through_one_store_switches_the_other(pair, server):
    a, b = pair
    rng = np.random.default_rng(5)
    items = [item(f"x{i}", rng, {"n": i}) for i in range(25)]
    a.upsert(items)
    old_target = a._server.target
    new = make_schema(model_version="fusion-2", fused_dim=8)
    assert a.reindex(new, fuse_to(8)) == 25
    client = a._conn.client
    assert client.describe_alias(a.items_collection)["collection_name"] != old_target
    # b never reads the replaced collection: its search of the old space fails as "switched", not wrongly
    with pytest.raises(StoreSwitched):
        b.search(items[0].fused, 3)
    assert b.schema.model_version == "fusion-2"
    assert {h.item_id for h in b.search(np.ones(8, np.float32), 25)} == {it.item_id for it in items}
    assert b.get(["x1"])["x1"].model_version == "fusion-2"
    # a store left idle notices within state_ttl_s, without a failed call
    c = MilvusStore(server.uri, make_schema(model_version="fusion-2", fused_dim=8),
                    items_collection=a.items_collection, interactions_collection=a.interactions_collection, server=FAST)
    try:
        a.reindex(make_schema(model_version="fusion-3", fused_dim=8), fuse_to(8))
        time.sleep(FAST.state_ttl_s)
        assert c.sync() and c.schema.model_version == "fusion-3"
    finally:
        c.close()
    # replaced collections go after retire_grace_s, never the one the alias names
    deadline = time.monotonic() + 10
    while client.has_collection(old_target) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not client.has_collection(old_target)
    assert client.has_collection(client.describe_alias(a.items_collection)["collection_name"])


def test_writes_racing_a_reindex_are_never_lost(pair):
    """While a re-indexes, b keeps writing (re-fusing on SchemaMismatch, as the Gateway does): every write
    b acknowledged is in the new collection with the new model's vector."""
    a, b = pair
    rng = np.random.default_rng(6)
    a.upsert([item(f"base{i}", rng) for i in range(200)])
    new = make_schema(model_version="fusion-2", fused_dim=8)
    acked: list[str] = []
    refused: list[str] = []
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            it = item(f"w{n}", rng)
            try:
                b.upsert([it])
            except SchemaMismatch:  # the store switched: fuse with the new model and write again
                it.fused, it.model_version = fuse_to(8)([it])[0], "fusion-2"
                refused.append(it.item_id)
                b.upsert([it])
            acked.append(it.item_id)
            n += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.5)
        a.reindex(new, fuse_to(8))
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(60)
    assert refused and len(acked) > len(refused)
    stored = a.get(acked)
    assert sorted(stored) == sorted(acked)
    assert {s.model_version for s in stored.values()} == {"fusion-2"}
    assert a.count() == 200 + len(acked)


def test_concurrent_reindexes_to_one_model_build_it_once(pair):
    a, b = pair
    rng = np.random.default_rng(7)
    a.upsert([item(f"c{i}", rng) for i in range(20)])
    new = make_schema(model_version="fusion-2", fused_dim=8)
    results: dict[str, int] = {}
    threads = [threading.Thread(target=lambda s=s, k=k: results.__setitem__(k, s.reindex(new, fuse_to(8))))
               for k, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results.values()) == [0, 20]
    names = [n for n in a._conn.client.list_collections() if n.startswith(a.items_collection + "__r")]
    assert len(names) <= 2  # the live one, and the replaced one until its grace is over
    assert a.schema == b.schema == new


def test_writers_wait_for_a_live_lock_and_break_a_dead_one(pair):
    a, b = pair
    rng = np.random.default_rng(8)
    lock = a._server.lock
    lock.acquire("test", timeout_s=5)
    try:
        wrote = threading.Event()
        t = threading.Thread(target=lambda: (b.upsert([item("late", rng)]), wrote.set()))
        t.start()
        assert not wrote.wait(1.5)  # held back while the lock is alive (heartbeats every lease/3)
    finally:
        lock.release()
    assert wrote.wait(10) and a.get(["late"])
    t.join()
    # a lock whose holder died (no heartbeat for lock_lease_s) holds nobody back
    client = a._conn.client
    client.create_collection(lock.name, schema=marker_schema()[0],
                             properties={PROP_LOCK: json.dumps({"holder": "dead", "what": "test"}),
                                         PROP_BEAT: repr(time.time() - 60)})
    b.upsert([item("after-dead", rng)])
    assert a.reindex(make_schema(model_version="fusion-2", fused_dim=8), fuse_to(8)) == 2
    assert not client.has_collection(lock.name)


def test_a_write_gives_up_after_write_wait_s(server):
    opts = ServerOptions(write_wait_s=0.5, lock_lease_s=30)
    kw = dict(items_collection="t_giveup", interactions_collection="t_giveup_ev", server=opts)
    a, b = MilvusStore(server.uri, make_schema(), **kw), MilvusStore(server.uri, make_schema(), **kw)
    try:
        a._server.lock.acquire("test", 5)
        with pytest.raises(Unavailable):
            b.upsert([item("x", np.random.default_rng(9))])
    finally:
        a._server.lock.release()
        a.close()
        b.close()


def test_reopen_keeps_data_and_refuses_other_encoders(server):
    rng = np.random.default_rng(10)
    kw = dict(items_collection="t_reopen", interactions_collection="t_reopen_ev")
    it = item("keep", rng, {"a": 1})
    with MilvusStore(server.uri, make_schema(), **kw) as s:
        s.upsert([it])
    with MilvusStore(server.uri, make_schema(), **kw) as s:
        assert_same_item(s.get(["keep"])["keep"], it)
    with pytest.raises(SchemaMismatch, match="encoder version"):
        MilvusStore(server.uri, make_schema(encoder_versions={"text": "other", "image": "effnet-v1"}), **kw)


def test_in_memory_index_is_refused_on_a_server(server):
    from pydantic import ValidationError

    from fusionrec.gateway.config import StoreConfig

    with pytest.raises(ValueError, match="Lite"):
        MilvusStore(server.uri, make_schema(), items_collection="t_mem", search_backend="memory")
    with pytest.raises(ValidationError, match="Lite"):  # refused when the config is read, before deploying
        StoreConfig(uri=server.uri, search_backend="memory")
    assert StoreConfig(uri=server.uri).search_backend == "auto"


def test_an_encoder_swap_fills_through_one_store_and_commits_for_all(pair):
    a, b = pair
    rng = np.random.default_rng(12)
    items = [item(f"s{i}", rng) for i in range(6)]
    a.upsert(items)
    assert not a.shadow("image").begin("effnet-v2", 6)
    assert b.put_shadow("image", {it.item_id: vec(rng, 6) for it in items[:4]})
    new = make_schema(encoder_versions={"text": "minilm-v1", "image": "effnet-v2"}, model_version="fusion-2")
    with pytest.raises(Exception, match="no shadow vector yet"):
        a.commit_swap("image", new, lambda batch: np.stack([it.fused for it in batch]))
    shadow = {it.item_id: vec(rng, 6) for it in items[4:]}
    assert b.put_shadow("image", shadow)
    assert a.commit_swap("image", new, lambda batch: np.stack([it.fused for it in batch])) == 6
    assert not b.put_shadow("image", shadow)  # committed: nothing lands in a dropped shadow
    got = b.get(["s5"])["s5"]  # b reads the new collection at once: the new version and the shadow vector
    assert got.encoder_versions["image"] == "effnet-v2"
    time.sleep(FAST.state_ttl_s)
    assert b.sync() and b.schema == new  # and knows what its vectors are within state_ttl_s
    np.testing.assert_array_equal(got.modality_vectors["image"], shadow["s5"])
    assert b.shadow("image").state() is None


def test_precomputed_modalities_keep_their_vectors_label(server):
    """A modality without an encoder (bring-your-own vectors only) stores whatever label its vectors carry."""
    schema = make_schema(encoder_versions={"text": "minilm-v1"})  # image: precomputed, no encoder version
    with MilvusStore(server.uri, schema, items_collection="t_byo", interactions_collection="t_byo_ev") as s:
        it = item("p", np.random.default_rng(13))
        it.encoder_versions = {"text": "minilm-v1", "image": "byo"}
        s.upsert([it])
        assert s.get(["p"])["p"].encoder_versions == {"text": "minilm-v1", "image": "byo"}
