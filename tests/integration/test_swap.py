"""Swap the text encoder while serving (gateway/swap.py): an option that changes the vectors (max_length)
makes a new version, re-encoded from kept content beside the served one, with Recommend and upserts
running throughout; a killed re-encoding replica and an interrupted run resume without redoing work."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from fusionrec.core.paths import default_config
from fusionrec.gateway.config import EncoderConfig
from fusionrec.v1 import recommender_pb2 as pb
from test_deploy_settings import replicas

pytestmark = pytest.mark.integration

SHORT = EncoderConfig(name="minilm-l6-v2", options={"max_length": 128})


class Traffic(threading.Thread):
    """Recommend (history + text query) and upserts with text content, in a loop, counting failures."""

    def __init__(self, client, user: str) -> None:
        super().__init__(daemon=True)
        self.client, self.user = client, user
        self.calls, self.failures, self.upserted = 0, [], []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                reply = self.client.stub.Recommend(pb.RecommendRequest(
                    user_id=self.user, k=3, query=pb.Content(text="a calm photo of a cat")), timeout=30)
                assert reply.items and not reply.degraded, reply
                if self.calls % 10 == 0:
                    item_id = f"swap-new-{self.calls}"
                    self.client.stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.ItemInput(
                        item_id=item_id, content=pb.Content(text=f"a new item {self.calls}"))]), timeout=60)
                    self.upserted.append(item_id)
            except (grpc.RpcError, AssertionError) as err:
                self.failures.append(repr(err)[:300])
            self.calls += 1
            time.sleep(0.05)


def _stored(client, ids: list[str]) -> list[str]:
    """The ids still stored (earlier tests of the shared service delete some)."""
    out = []
    for i in ids:
        try:
            client.stub.GetItem(pb.GetItemRequest(item_id=i))
            out.append(i)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
    return out


def _text_versions(client, ids: list[str]) -> set[str]:
    return {client.stub.GetItem(pb.GetItemRequest(item_id=i)).encoder_versions["text"] for i in ids}


def _kill_incoming_replica(app_name: str) -> None:
    import ray

    swap_app = f"{app_name}-swap-text"
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{swap_app}#"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)


def test_swap_text_encoder_while_serving_resumes_after_a_kill(service, client, loaded):
    from ray import serve

    from fusionrec.gateway import swap
    from fusionrec.gateway.runtime import call_handle, connect

    connect("auto")
    retrieval = serve.get_deployment_handle("Retrieval", service.app_name)
    catalog = _stored(client, list(loaded["items"]))
    before = replicas(service.app_name)
    old = _text_versions(client, catalog)
    traffic = Traffic(client, loaded["events"][0]["user_id"])
    traffic.start()
    try:
        # An interrupted first run: the incoming encoder starts, a third of the items are re-encoded ...
        rendered = swap.render_config(default_config(), service.overrides)["applications"][0]
        incoming = swap._start_incoming("text", SHORT, rendered, service.app_name)
        info = call_handle(incoming, "info", timeout_s=600)
        assert info["version"] not in old  # max_length changes the vectors, so the version
        call_handle(retrieval, "begin_swap", "text", info["version"], info["dim"])
        todo = call_handle(retrieval, "swap_todo", "text")
        first = dict(list(todo.items())[: len(catalog) // 3])
        asyncio.run(swap._reencode_chunk(retrieval, incoming, "text", first))
        _kill_incoming_replica(service.app_name)  # ... and its replica dies
        report = swap.swap_encoder("text", SHORT, default_config(), overrides=service.overrides,
                                   app_name=service.app_name, echo=lambda _: None)
    finally:
        traffic.stop.set()
        traffic.join(timeout=60)
    assert traffic.failures == [] and traffic.calls > 10 and traffic.upserted
    assert report["to"] == info["version"] and report["from"] in old
    holding_text = len(catalog) + len(traffic.upserted)
    assert report["reembedded_items"] <= holding_text - len(first)  # resumed: the first third is not redone
    assert _text_versions(client, catalog + traffic.upserted) == {info["version"]}
    reply = client.stub.Recommend(pb.RecommendRequest(query=pb.Content(text="a calm photo of a cat"), k=3))
    assert reply.encoder_versions["text"] == info["version"] and reply.items
    after = replicas(service.app_name)
    for name in ("Gateway", "ImageEncoder", "AudioEncoder", "Fusion", "Retrieval"):
        assert after[name] == before[name], f"{name} was restarted by the text encoder swap"
    assert f"{service.app_name}-swap-text" not in serve.status().applications
    # Swap back to the configured encoder, so the shared service ends as it started.
    back = swap.swap_encoder("text", EncoderConfig(name="minilm-l6-v2"), default_config(),
                             overrides=service.overrides, app_name=service.app_name, echo=lambda _: None)
    assert back["to"] in old and _text_versions(client, catalog) == old
