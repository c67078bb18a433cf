"""Prometheus metrics without Ray: the real front door (grpc.aio) counts RPCs and refusals by reason into
the real /metrics endpoint; the replica-stats collector merges, expires and exposes what replicas report;
re-index progress counted over a real RetrievalEngine re-index (Milvus Lite)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusionrec.gateway.config import LimitsConfig, ServerConfig
from fusionrec.gateway.metrics import Metrics, MetricsEndpoint, drop_reason, serve_metrics
from fusionrec.gateway.metrics_cluster import BATCH_BUCKETS, ClusterCollector, EncoderLoad, StoreProgress
from fusionrec.gateway.pipeline import Recommender
from fusionrec.gateway.server import create_server
from fusionrec.gateway.service import RecommenderServicer
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from loop_support import LoopThread


class _HeldServicer(RecommenderServicer):
    """The real servicer (validation first), whose GetItem waits until released: fills in-flight slots."""

    def __init__(self, cfg: ServerConfig) -> None:
        super().__init__(Recommender({}, None, None, LimitsConfig(), cfg), cfg.default_deadline_ms)
        self.release: asyncio.Event | None = None

    async def GetItem(self, request, context):
        self.release = self.release or asyncio.Event()
        await self.release.wait()
        return pb.Item(item_id=request.item_id)


def scrape_settled(port: int, n_series: int) -> dict[str, dict[tuple, float]]:
    """A scrape once ``fusionrec_rpc_requests_total`` has ``n_series`` series (≤ 10 s): an abort's status
    reaches the caller a moment before the server's interceptors record it."""
    deadline = time.monotonic() + 10
    samples = scrape(port)
    while len(samples.get("fusionrec_rpc_requests_total", {})) < n_series and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(port)
    return samples


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """family sample name -> {sorted label items: value}, from GET /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@contextlib.contextmanager
def front_door(cfg: ServerConfig, started: bool = True):
    loop = LoopThread()
    loop.start()
    metrics = Metrics()
    servicer = _HeldServicer(cfg)
    srv, port, health = loop.call(create_server(servicer, cfg, metrics))
    health.started = started
    endpoint = MetricsEndpoint(metrics.registry, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.RecommenderStub(channel), endpoint.port, servicer, loop
    finally:
        channel.close()
        endpoint.stop()
        loop.call(srv.stop(0))
        loop.loop.call_soon_threadsafe(loop.loop.stop)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_exposition_has_every_front_door_family_all_prefixed():
    m = Metrics()
    m.observe_rpc("/fusionrec.v1.Recommender/Recommend", grpc.StatusCode.OK, 0.02)
    m.observe_stages("Recommend", {"encode": 5.0, "retrieve_and_rank": 7.0})
    m.observe_dropped({"image": "deadline: encoder took longer than 40 ms"})
    m.reject("/fusionrec.v1.Recommender/Recommend", "inflight_limit")
    endpoint = serve_metrics(m.registry, "127.0.0.1", 0)
    try:
        samples = scrape(endpoint.port)
    finally:
        endpoint.stop()
    assert all(name.startswith("fusionrec_") for name in samples), sorted(samples)
    assert samples["fusionrec_rpc_requests_total"] == {(("code", "OK"), ("method", "Recommend")): 1.0}
    assert samples["fusionrec_rpc_duration_seconds_count"] == {(("method", "Recommend"),): 1.0}
    stages = samples["fusionrec_stage_duration_seconds_sum"]
    assert stages[(("method", "Recommend"), ("stage", "retrieve_and_rank"))] == pytest.approx(0.007)
    assert samples["fusionrec_degraded_responses_total"] == {(): 1.0}
    assert samples["fusionrec_modalities_dropped_total"] == {(("modality", "image"), ("reason", "deadline")): 1.0}
    assert samples["fusionrec_rejected_requests_total"] == {
        (("method", "Recommend"), ("reason", "inflight_limit")): 1.0}


def test_a_taken_metrics_port_does_not_stop_the_gateway():
    endpoint = serve_metrics(Metrics().registry, "127.0.0.1", 0)
    try:
        assert serve_metrics(Metrics().registry, "127.0.0.1", endpoint.port) is None
    finally:
        endpoint.stop()


def test_drop_reasons_are_bounded_labels():
    # the texts gateway/pipeline.py puts into modalities_dropped
    assert drop_reason("deadline reached before encoding") == "deadline"
    assert drop_reason("deadline: encoder took longer than 12 ms") == "deadline"
    assert drop_reason("encoder error: RayActorError") == "encoder_error"
    assert drop_reason("something new") == "other"


def test_front_door_counts_codes_and_refusals_by_reason():
    cfg = ServerConfig(port=0, max_inflight_requests=1)
    with front_door(cfg) as (stub, port, servicer, loop):
        bad = pb.RecommendRequest(user_id="u1", k=10_000)  # over limits.max_k
        assert _code(lambda: stub.Recommend(bad, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
        held = stub.GetItem.future(pb.GetItemRequest(item_id="a"), timeout=30)
        for _ in range(200):  # until the held call occupies the only slot
            if scrape(port)["fusionrec_inflight_requests"][()] == 1:
                break
        assert _code(lambda: stub.GetItem(pb.GetItemRequest(item_id="b"), timeout=10)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        loop.loop.call_soon_threadsafe(servicer.release.set)
        assert held.result().item_id == "a"
        samples = scrape_settled(port, 3)
    requests = samples["fusionrec_rpc_requests_total"]
    assert requests[(("code", "INVALID_ARGUMENT"), ("method", "Recommend"))] == 1
    assert requests[(("code", "OK"), ("method", "GetItem"))] == 1
    assert requests[(("code", "RESOURCE_EXHAUSTED"), ("method", "GetItem"))] == 1
    assert samples["fusionrec_rejected_requests_total"] == {(("method", "GetItem"), ("reason", "inflight_limit")): 1}
    assert samples["fusionrec_inflight_requests"][()] == 0
    assert samples["fusionrec_rpc_duration_seconds_count"][(("method", "GetItem"),)] == 2


def test_refusals_before_start_up_and_without_token():
    with front_door(ServerConfig(port=0, auth_token="s3cret"), started=False) as (stub, port, _, _loop):
        req = pb.RecommendRequest(user_id="u1")
        assert _code(lambda: stub.Recommend(req, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        meta = (("authorization", "Bearer s3cret"),)
        assert _code(lambda: stub.Recommend(req, timeout=10, metadata=meta)) == grpc.StatusCode.UNAVAILABLE
        samples = scrape_settled(port, 2)
    assert samples["fusionrec_rejected_requests_total"] == {
        (("method", "Recommend"), ("reason", "unauthenticated")): 1,
        (("method", "Recommend"), ("reason", "starting_up")): 1}
    assert samples["fusionrec_rpc_requests_total"] == {
        (("code", "UNAUTHENTICATED"), ("method", "Recommend")): 1,
        (("code", "UNAVAILABLE"), ("method", "Recommend")): 1}


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _collector(replies: list[dict], clock: _Clock) -> tuple[ClusterCollector, LoopThread, list[int]]:
    """A collector whose pull answers ``replies`` in turn (what the handles would return)."""
    loop = LoopThread()
    loop.start()
    pulls: list[int] = []

    async def pull() -> dict:
        pulls.append(1)
        return replies[min(len(pulls), len(replies)) - 1]

    return ClusterCollector(pull, loop.loop, refresh_s=5.0, wait_s=5.0, expire_s=60.0, clock=clock), loop, pulls


def _by_name(collector: ClusterCollector) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in collector.collect():
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _store(items: int, model_version: str, progress: dict | None = None) -> dict:
    return {"items": items, "index_bytes": 4096, "model_version": model_version, "progress": progress or {}}


def test_collector_merges_replicas_caches_and_expires():
    load = EncoderLoad()
    for size in (1, 3, 3, 32, 300):
        load.batch(size)
    with load.waiting(5):
        busy = load.snapshot("r1", "text")
    other = EncoderLoad()
    other.batch(2)
    idle = other.snapshot("r2", "text")
    clock = _Clock()
    first = {"encoders": [busy, busy, idle], "store": _store(32, "m1"), "fusion_version": "m1", "errors": 0}
    later = {"encoders": [idle], "store": _store(40, "m1"), "fusion_version": "m2", "errors": 1}
    collector, loop, pulls = _collector([first, later], clock)
    try:
        got = _by_name(collector)
        assert got["fusionrec_encoder_queue_depth"] == {(("modality", "text"), ("replica", "r1")): 5,
                                                        (("modality", "text"), ("replica", "r2")): 0}
        buckets = {dict(k)["le"]: v for k, v in got["fusionrec_encoder_batch_size_bucket"].items()
                   if dict(k)["replica"] == "r1"}
        assert buckets["1.0"] == 1 and buckets["4.0"] == 3 and buckets["32.0"] == 4 and buckets["256.0"] == 4
        assert buckets["+Inf"] == 5 and len(buckets) == len(BATCH_BUCKETS) + 1
        assert got["fusionrec_encoder_batch_size_sum"][(("modality", "text"), ("replica", "r1"))] == 339
        assert got["fusionrec_encoder_replicas"] == {(("modality", "text"),): 2}
        assert got["fusionrec_store_items"] == {(): 32} and got["fusionrec_index_stale_seconds"] == {(): 0}

        clock.t += 2  # within refresh_s: the cached values, no pull
        assert _by_name(collector)["fusionrec_store_items"] == {(): 32} and len(pulls) == 1
        clock.t += 10  # a newer fusion model than the stored vectors': stale from now on
        got = _by_name(collector)
        assert len(pulls) == 2 and got["fusionrec_store_items"] == {(): 40}
        assert got["fusionrec_replica_stats_errors_total"] == {(): 1}
        clock.t += 60  # r1 unseen for 72 s > expire_s: dropped; r2 answered every pull
        got = _by_name(collector)
        assert got["fusionrec_index_stale_seconds"] == {(): 60}
        assert set(got["fusionrec_encoder_queue_depth"]) == {(("modality", "text"), ("replica", "r2"))}
    finally:
        loop.loop.call_soon_threadsafe(loop.loop.stop)


def test_a_slow_pull_never_blocks_a_scrape_past_wait_s():
    loop = LoopThread()
    loop.start()
    gate = asyncio.Event()

    async def pull() -> dict:
        await gate.wait()
        return {"encoders": [], "store": _store(7, "m1"), "fusion_version": "m1"}

    collector = ClusterCollector(pull, loop.loop, refresh_s=5.0, wait_s=0.2)
    try:
        got = _by_name(collector)  # answered after wait_s, without store values yet
        assert "fusionrec_store_items" not in got and got["fusionrec_replica_stats_age_seconds"] == {(): 0}
        loop.loop.call_soon_threadsafe(gate.set)
        for _ in range(100):
            if collector.store is not None:
                break
            threading.Event().wait(0.02)
        assert _by_name(collector)["fusionrec_store_items"] == {(): 7}
    finally:
        loop.loop.call_soon_threadsafe(loop.loop.stop)


def test_swap_progress_from_status_and_shadow_writes():
    progress = StoreProgress()
    progress.swap_status({"modality": "text", "items": 10, "done": 4})
    progress.shadow_written("text", 3)
    progress.shadow_written("image", 5)  # no image swap: nothing to count
    snap = progress.snapshot({"text": "minilm-v2"})
    assert snap["swaps"] == {"text": {"items": 10, "done": 7}}
    collector = ClusterCollector(lambda: None, asyncio.new_event_loop())
    collector.merge({"encoders": [], "store": _store(10, "m1", snap)})
    collector.pulled_at = float("inf")  # no pull in collect()
    got = _by_name(collector)
    assert got["fusionrec_swap_progress_ratio"] == {(("modality", "text"),): 0.7}
    assert got["fusionrec_swap_in_progress"] == {(("modality", "text"),): 1}
    assert progress.snapshot({})["swaps"] == {}  # the swap ended: forgotten


def test_reindex_progress_over_a_real_engine(tmp_path):
    pytest.importorskip("milvus_lite")
    import numpy as np

    from fusionrec.fusion.registry import get_fusion_model
    from fusionrec.retrieval.base import StoredItem, StoreSchema
    from fusionrec.retrieval.engine import RetrievalEngine

    dims, versions = {"text": 4, "image": 3}, {"text": "t1", "image": "i1"}
    model, other = (get_fusion_model("weighted-v0", dims, block_dim=b) for b in (4, 8))
    rng = np.random.default_rng(0)
    vectors = [{m: rng.standard_normal(d).astype(np.float32) for m, d in dims.items()} for _ in range(6)]
    ids = [f"item-{i}" for i in range(6)]
    items = [StoredItem(i, {}, v, f, dict(versions), model.version)
             for i, v, f in zip(ids, vectors, model.item_vectors(vectors, ids))]
    schema = StoreSchema(modality_dims=dims, fused_dim=model.dim, encoder_versions=versions,
                         model_version=model.version)
    engine = RetrievalEngine.open(str(tmp_path / "store.db"), schema)
    try:
        engine.upsert(items)
        progress = StoreProgress()
        seen: list[int] = []
        counted = progress.reindexing("reindex", engine.count(), other)
        count = counted._on_items
        counted._on_items = lambda n: (count(n), seen.append(progress.reindex["done"]))
        assert engine.reindex(counted, batch_size=4) == 6
        progress.reindex_finished()
        assert engine.schema.model_version == other.version
    finally:
        engine.close()
    assert seen == [4, 6]
    assert progress.snapshot({})["reindex"] == {"kind": "reindex", "running": False, "done": 6, "total": 6}
