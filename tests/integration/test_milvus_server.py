"""The Serve app on a real Milvus server (milvus-server 2.3.5, started here) with two Retrieval replicas.

The app runs next to the session's Lite app, in the same Ray cluster, as its own Serve application
(``fusionrec-ms``, deployed imperatively like an encoder swap's app, so the session app's declarative
config leaves it alone) with its own gRPC port; when this module runs alone it starts Ray itself and
stops it after. To stay light on 2 cores it has no encoders: items bring their own vectors
(precomputed modalities). Calls are forced onto one replica or the other with Serve's
``choose_replica``/``dispatch``: written through one replica, read through the other.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from fusionrec.retrieval.base import FilterSpec, InteractionEvent, StoredItem
from fusionrec.retrieval.query import QueryContent, RecommendQuery
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from milvus_server_support import MilvusServer

pytestmark = pytest.mark.integration

APP = "fusionrec-ms"
DIMS = {"tvec": 16, "avec": 8}
WEIGHTED = {"name": "weighted-v0", "options": {"block_dim": 8, "weights": {"tvec": 1.0, "avec": 1.0}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_ms_app(args: dict[str, Any], deployments: list[dict[str, Any]]):
    """The app of gateway/app.py:build_app without encoders, its deployment options applied here (an
    imperative app gets no `deployments:` list from Serve)."""
    from fusionrec.gateway.app import Gateway, deployment_options, gateway_args
    from fusionrec.gateway.config import AppConfig
    from fusionrec.gateway.deployments import FusionDeployment, RetrievalDeployment

    cfg = AppConfig.model_validate(args)
    fusion = FusionDeployment.options(**deployment_options("Fusion", deployments)).bind({}, cfg.precomputed_modalities)
    retrieval = RetrievalDeployment.options(**deployment_options("Retrieval", deployments)).bind(
        cfg.store.model_dump(), {}, fusion, cfg.precomputed_modalities)
    return Gateway.options(**deployment_options("Gateway", deployments)).bind(gateway_args(cfg), {}, fusion, retrieval)


def write_config(path, store_uri: str, content_dir: str) -> Any:
    small = {"num_cpus": 0.05}
    config = {
        "proxy_location": "Disabled",
        "logging_config": {"enable_access_log": False},
        "applications": [{
            "name": APP, "route_prefix": None, "import_path": "fusionrec.gateway.app:build_app",
            "args": {"server": {"port": _free_port(), "metrics_port": 0}, "encoders": {},
                     "precomputed_modalities": DIMS,
                     "store": {"uri": store_uri, "content_uri": content_dir, "state_ttl_s": 0.5}},
            "deployments": [
                {"name": "Gateway", "ray_actor_options": small},
                {"name": "Fusion", "ray_actor_options": small, "user_config": WEIGHTED},
                {"name": "Retrieval", "ray_actor_options": small, "num_replicas": 2, "max_ongoing_requests": 64},
            ],
        }],
    }
    path.write_text(yaml.safe_dump(config))
    return path


class MsApp:
    def __init__(self, tmp, server: MilvusServer) -> None:
        import ray

        from fusionrec.gateway.runtime import start

        self.tmp, self.server = tmp, server
        self.started_ray = not ray.is_initialized()
        self.config = write_config(tmp / "ms.yaml", server.uri, str(tmp / "content"))
        self.running = start(self.config, builder=build_ms_app, num_cpus=2)
        self.channel = grpc.insecure_channel(self.running.target)
        self.stub = pb_grpc.RecommenderStub(self.channel)

    def close(self) -> None:
        from ray import serve

        from fusionrec.gateway.runtime import stop

        self.channel.close()
        if self.started_ray:
            stop()
        else:
            serve.delete(APP)


@pytest.fixture(scope="module")
def ms(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ms")
    with MilvusServer(tmp / "milvus") as server:
        app = MsApp(tmp, server)
        try:
            yield app
        finally:
            app.close()


# ---------------------------------------------------------------------------- helpers

def handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, APP)


def retrieval_replicas() -> list[str]:
    from fusionrec.gateway.runtime import replica_ids

    return sorted(replica_ids(APP).get("Retrieval", ()))


def on_replica(replica: str, method: str, *args: Any, timeout_s: float = 60) -> Any:
    """Call ``method`` on one given Retrieval replica: Serve picks replicas, we keep the pick we want."""
    async def call() -> Any:
        h = getattr(handle("Retrieval"), method)
        for _ in range(500):
            async with h.choose_replica() as picked:
                if picked.replica_id.endswith(replica):
                    return await asyncio.wait_for(_awaited(h.dispatch(picked, *args)), timeout_s)
            await asyncio.sleep(0.01)
        raise AssertionError(f"Serve never picked replica {replica}")

    return asyncio.run(call())


async def _awaited(response: Any) -> Any:
    return await response


def call(name: str, method: str, *args: Any) -> Any:
    from fusionrec.gateway.runtime import call_handle

    return call_handle(handle(name), method, *args, timeout_s=120)


def vectors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {m: rng.standard_normal(d).astype(np.float32) for m, d in DIMS.items()}


def stored_items(ids: list[str], rng: np.random.Generator, attrs: dict | None = None) -> list[StoredItem]:
    """Items as the Gateway stores them: vectors fused by the Fusion deployment with the store's model."""
    version = call("Retrieval", "info")["model_version"]
    vecs = [vectors(rng) for _ in ids]
    fused = call("Fusion", "item_vectors", vecs, ids, version)
    return [StoredItem(item_id=i, attributes=dict(attrs or {}), modality_vectors=v, fused=f,
                       encoder_versions={}, model_version=version) for i, v, f in zip(ids, vecs, fused)]


def ask(user: str, k: int = 5, filters: list[FilterSpec] | None = None, **kw: Any) -> RecommendQuery:
    return RecommendQuery(user_id=user, history_item_ids=[], query=QueryContent(), k=k, filters=filters or [],
                          exclude_item_ids=[], **kw)


def pb_item(item_id: str, rng: np.random.Generator, genre: str) -> pb.ItemInput:
    return pb.ItemInput(item_id=item_id, attributes={"genre": pb.AttributeValue(string_value=genre)},
                        vectors=[pb.ModalityVector(modality=m, values=v.tolist()) for m, v in vectors(rng).items()])


# ---------------------------------------------------------------------------- tests

def test_two_replicas_share_items_users_and_deletes(ms):
    a, b = retrieval_replicas()
    rng = np.random.default_rng(1)
    version = call("Retrieval", "info")["model_version"]
    catalog = stored_items([f"c{i}" for i in range(12)], rng, {"genre": "rock"})
    assert on_replica(a, "upsert", catalog) == 12
    # a user recorded through a is known to b, and b recommends what a stored (seen items left out)
    on_replica(a, "record_interactions", [InteractionEvent("u1", "c1", "click", 1.0),
                                          InteractionEvent("u1", "c2", "click", 2.0)])
    ranked = on_replica(b, "recommend", ask("u1", k=20), {}, version, 50)
    assert ranked.used_history and not ranked.popular
    assert {c.item_id for c in ranked.candidates} == {f"c{i}" for i in range(12)} - {"c1", "c2"}
    # an item written through b is recommended through a
    fresh = stored_items(["fresh"], rng, {"genre": "jazz"})
    on_replica(b, "upsert", fresh)
    only_jazz = ask("u1", k=5, filters=[FilterSpec("genre", equals="jazz")], include_seen=True)
    assert [c.item_id for c in on_replica(a, "recommend", only_jazz, {}, version, 50).candidates] == ["fresh"]
    # deleted through a: gone for b, in every answer
    assert on_replica(a, "delete", ["c3", "fresh"]) == ["c3", "fresh"]
    assert on_replica(b, "get", ["c3", "fresh", "c4"]).keys() == {"c4"}
    ids = {c.item_id for c in on_replica(b, "recommend", ask("u1", k=20), {}, version, 50).candidates}
    assert ids == {f"c{i}" for i in range(12)} - {"c1", "c2", "c3"}
    # and over gRPC, whichever replica serves each call
    for _ in range(10):
        reply = ms.stub.Recommend(pb.RecommendRequest(user_id="u1", k=20), timeout=30)
        assert {it.item_id for it in reply.items} == ids


def test_reindex_switches_both_replicas(ms):
    a, b = retrieval_replicas()
    rng = np.random.default_rng(2)
    ms.stub.UpsertItems(pb.UpsertItemsRequest(items=[pb_item(f"r{i}", rng, "pop") for i in range(8)]), timeout=60)
    old = call("Retrieval", "info")["model_version"]
    # a new fusion model, loaded in place as a user_config change would (an imperative app cannot change
    # one deployment's user_config without restarting them all: Serve versions its deployments at random)
    call("Fusion", "reconfigure", {**WEIGHTED, "options": {**WEIGHTED["options"], "seed": 5}})
    result = on_replica(a, "reindex")
    assert result["changed"] and result["model_version"] != old
    new = result["model_version"]
    deadline = time.monotonic() + 5
    while on_replica(b, "info")["model_version"] != new and time.monotonic() < deadline:
        time.sleep(0.2)
    assert on_replica(b, "info")["model_version"] == new  # b followed the alias without a restart
    assert on_replica(b, "recommend", ask("u1"), {}, old, 50) is None  # the old model: refused, never mixed
    assert on_replica(b, "recommend", ask("u1"), {}, new, 50).candidates
    assert on_replica(b, "get", ["r1"])["r1"].model_version == new
    assert retrieval_replicas() == [a, b]  # nobody restarted
    deadline = time.monotonic() + 10
    reply = ms.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3), timeout=30)
    while reply.model_version != new and time.monotonic() < deadline:  # the Gateway follows within 2 s
        time.sleep(0.5)
        reply = ms.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3), timeout=30)
    assert reply.model_version == new and len(reply.items) == 3


def test_killing_a_retrieval_replica_loses_nothing_acknowledged(ms):
    import ray

    victim = retrieval_replicas()[0]
    rng = np.random.default_rng(3)
    acked: list[str] = []
    failed = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal failed
        n = 0
        while not stop.is_set():
            batch = [pb_item(f"k{n}-{j}", rng, "folk") for j in range(4)]
            n += 1
            try:
                ms.stub.UpsertItems(pb.UpsertItemsRequest(items=batch), timeout=30)
                acked.extend(it.item_id for it in batch)
            except grpc.RpcError:
                failed += 1  # not acknowledged: may or may not be stored

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(2)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Retrieval#{victim}", namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 120
        while (victim in retrieval_replicas() or len(retrieval_replicas()) < 2) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.set()
        t.join(60)
    replicas = retrieval_replicas()
    assert len(replicas) == 2 and victim not in replicas  # Serve replaced it
    assert len(acked) > 20
    for replica in replicas:
        assert on_replica(replica, "get", acked).keys() == set(acked)
    for item_id in acked[:: max(1, len(acked) // 10)]:
        assert ms.stub.GetItem(pb.GetItemRequest(item_id=item_id), timeout=30).item_id == item_id
