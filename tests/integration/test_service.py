"""End to end over gRPC against the real Serve app with real encoders and Milvus Lite."""

from __future__ import annotations

import collections
import hashlib
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from fusionrec.core.paths import default_config
from fusionrec.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def _exists(client, item_id: str) -> bool:
    try:
        client.stub.GetItem(pb.GetItemRequest(item_id=item_id))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def _attr(item: pb.ScoredItem, name: str):
    v = item.attributes[name]
    return getattr(v, v.WhichOneof("kind"))


def test_health_turns_serving_only_after_models_load(service, client):
    assert client.serving()
    # The probe ran from before start: the service was never SERVING before it finished loading.
    assert service.health_trace[-1] == "SERVING"
    assert service.health_trace.count("SERVING") == 1
    assert set(service.info["encoder_versions"]) == {"text", "image", "audio"}


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def test_everything_started_listens_on_loopback_only(service):
    """Ray (GCS, raylet, agents, workers) and the gRPC front door listen on loopback only.

    The one exception is not configurable: each Serve replica's inter-deployment gRPC server binds
    "[::]:0" (ray/serve/_private/replica.py, Ray 2.60): one such port per replica, nothing else.
    """
    started = psutil.Process().children(recursive=True)
    assert any("raylet" in p.name() for p in started)  # this process did start Ray
    listening = []
    for proc in started:
        try:
            listening += [(proc.pid, proc.name(), c.laddr) for c in proc.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:  # e.g. a worker that exited meanwhile
            continue
    assert any(addr.port == service.port and addr.ip in LOOPBACK for _, _, addr in listening)
    exposed = [(pid, name, f"{addr.ip}:{addr.port}") for pid, name, addr in listening if addr.ip not in LOOPBACK]
    serve_internal = [e for e in exposed if e[1].startswith("ray::ServeReplica") and e[2].startswith(":::")]
    assert len({pid for pid, _, _ in serve_internal}) == len(serve_internal), serve_internal  # one per replica
    assert [e for e in exposed if e not in serve_internal] == [], f"listening beyond loopback: {exposed}"


def test_reflection_lists_the_service(service):
    db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(service.target))
    services = set(db.get_services())
    assert "fusionrec.v1.Recommender" in services
    assert "grpc.health.v1.Health" in services


def test_upserted_items_keep_all_modalities(client, loaded):
    item = client.stub.GetItem(pb.GetItemRequest(item_id="item-0003"))
    assert list(item.modalities) == ["audio", "image", "text"]
    assert set(item.encoder_versions) == {"audio", "image", "text"}
    assert item.attributes["category"].string_value == loaded["items"]["item-0003"]["attributes"]["category"]


def test_upserted_content_is_kept_and_reads_back_from_the_content_folder(service, client, loaded, media_dir):
    assert list(client.stub.GetItem(pb.GetItemRequest(item_id="item-0003")).content_kept) == ["audio", "image", "text"]
    text, image = "a steaming cup of coffee on a wooden table", (media_dir / "images" / "coffee.png").read_bytes()
    item = pb.ItemInput(item_id="kept-1", content=pb.Content(text=text, image=image))
    assert client.stub.UpsertItems(pb.UpsertItemsRequest(items=[item])).upserted == 1
    try:
        assert list(client.stub.GetItem(pb.GetItemRequest(item_id="kept-1")).content_kept) == ["image", "text"]
        for data in (text.encode("utf-8"), image):
            digest = hashlib.sha256(data).hexdigest()
            assert (service.content_dir / digest[:2] / digest).read_bytes() == data
    finally:
        client.stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["kept-1"]))


def test_recommend_by_user_excludes_seen_and_honours_k(client, loaded):
    user = loaded["events"][0]["user_id"]
    seen = {e["item_id"] for e in loaded["events"] if e["user_id"] == user}
    reply = client.stub.Recommend(pb.RecommendRequest(user_id=user, k=7, debug_timings=True))
    ids = [i.item_id for i in reply.items]
    assert len(ids) == 7 and len(set(ids)) == 7
    assert not seen & set(ids)
    assert "history" in reply.modalities_used and not reply.degraded
    assert [i.score for i in reply.items] == sorted((i.score for i in reply.items), reverse=True)
    for item in reply.items:  # contributions are additive parts of the score
        assert sum(c.score for c in item.contributions) == pytest.approx(item.score, abs=1e-4)
    assert {t.stage for t in reply.timings} == {"retrieve_and_rank"}
    assert reply.request_id and reply.model_version


def test_recommend_follows_user_taste(client, loaded):
    """Users prefer some categories; their recommendations should lean the same way."""
    hits = total = 0
    for user in sorted({e["user_id"] for e in loaded["events"]}):
        history = [loaded["items"][e["item_id"]]["attributes"]["category"] for e in loaded["events"] if e["user_id"] == user]
        favourite = collections.Counter(history).most_common(1)[0][0]
        reply = client.stub.Recommend(pb.RecommendRequest(user_id=user, k=3, include_seen=True))
        hits += sum(_attr(i, "category") == favourite for i in reply.items)
        total += len(reply.items)
    assert hits / total >= 0.6, f"only {hits}/{total} recommendations in the users' favourite category"


def test_image_query_returns_the_item_made_from_that_image(client, loaded):
    for item_id in ("item-0002", "item-0017"):
        image = (loaded["dir"] / loaded["items"][item_id]["image"]).read_bytes()
        reply = client.stub.Recommend(pb.RecommendRequest(query=pb.Content(image=image), k=5))
        assert reply.items[0].item_id == item_id
        assert reply.modalities_used == ["image"]


def test_audio_query_returns_the_item_made_from_that_clip(client, loaded):
    item_id = "item-0005"
    audio = (loaded["dir"] / loaded["items"][item_id]["audio"]).read_bytes()
    reply = client.stub.Recommend(pb.RecommendRequest(query=pb.Content(audio=audio), k=5))
    assert reply.items[0].item_id == item_id


def test_text_query_finds_items_described_alike(client, loaded):
    item_id = "item-0009"
    row = loaded["items"][item_id]
    reply = client.stub.Recommend(pb.RecommendRequest(query=pb.Content(text=row["text"]), k=5))
    assert reply.items[0].item_id == item_id
    same = sum(_attr(i, "category") == row["attributes"]["category"] for i in reply.items)
    assert same >= 3


def test_filters_and_exclusions_hold(client, loaded):
    user = loaded["events"][0]["user_id"]
    exclude = ["item-0001", "item-0004", "item-0010"]
    cases = [
        (pb.Filter(attribute="mood", equals=pb.AttributeValue(string_value="calm")), lambda i: _attr(i, "mood") == "calm"),
        (pb.Filter(attribute="year", range=pb.NumericRange(min=2000, max=2015)), lambda i: 2000 <= _attr(i, "year") <= 2015),
        (pb.Filter(attribute="price", range=pb.NumericRange(max=20)), lambda i: _attr(i, "price") <= 20),
        (pb.Filter(attribute="category", in_set=pb.ValueSet(values=[pb.AttributeValue(string_value="cat"),
                                                                     pb.AttributeValue(string_value="rocket")])),
         lambda i: _attr(i, "category") in ("cat", "rocket")),
        (pb.Filter(attribute="explicit", equals=pb.AttributeValue(bool_value=False)), lambda i: _attr(i, "explicit") is False),
    ]
    for flt, holds in cases:
        reply = client.stub.Recommend(pb.RecommendRequest(user_id=user, k=20, filters=[flt],
                                                          exclude_item_ids=exclude, include_seen=True))
        assert reply.items, f"no result for {flt}"
        assert all(holds(i) for i in reply.items), flt
        assert not {i.item_id for i in reply.items} & set(exclude)
        expected = sum(1 for r in loaded["items"].values() if r["id"] not in exclude
                       and holds(pb.ScoredItem(attributes={k: _pb_value(v) for k, v in r["attributes"].items()})))
        assert len(reply.items) == min(20, expected)


def _pb_value(v):
    if isinstance(v, bool):
        return pb.AttributeValue(bool_value=v)
    if isinstance(v, (int, float)):
        return pb.AttributeValue(number_value=v)
    return pb.AttributeValue(string_value=v)


def test_bad_requests_get_invalid_argument_and_service_keeps_serving(client, loaded, media_dir):
    user = loaded["events"][0]["user_id"]
    bad = [
        pb.RecommendRequest(user_id=user, k=100000),
        pb.RecommendRequest(user_id=user, k=-1),
        pb.RecommendRequest(user_id=user, filters=[pb.Filter(attribute="x) or (1==1", equals=pb.AttributeValue(number_value=1))]),
        pb.RecommendRequest(user_id=user, filters=[pb.Filter(attribute="year", range=pb.NumericRange(min=5, max=1))]),
        pb.RecommendRequest(user_id=user, query=pb.Content(image=b"\x89PNG\r\n\x1a\n garbage")),
        pb.RecommendRequest(user_id=user, query=pb.Content(audio=(media_dir / "audio" / "boom.wav").read_bytes()[:60])),
        pb.RecommendRequest(),
    ]
    for request in bad:
        code, details = _code(client.stub.Recommend, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (request, code, details)
        assert details
    code, details = _code(client.stub.Recommend, pb.RecommendRequest(user_id=user, query=pb.Content(image=b"not an image")))
    assert "query.image" in details
    assert client.stub.Recommend(pb.RecommendRequest(user_id=user, k=3)).items


def test_unknown_things_are_not_found(client, loaded):
    assert _code(client.stub.GetItem, pb.GetItemRequest(item_id="nope"))[0] == grpc.StatusCode.NOT_FOUND
    code, details = _code(client.stub.RecordInteractions, pb.RecordInteractionsRequest(
        interactions=[pb.Interaction(user_id="u", item_id="nope", kind="view")]))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details


def test_a_cold_user_gets_popular_items_within_filters_and_exclusions(client, loaded):
    counts = collections.Counter(e["item_id"] for e in loaded["events"])
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    existing = [i for i in ranked if _exists(client, i)]
    reply = client.stub.Recommend(pb.RecommendRequest(user_id="stranger", k=5))
    assert list(reply.modalities_used) == ["popular"] and not reply.degraded
    assert [it.item_id for it in reply.items] == existing[:5]
    assert [c.modality for c in reply.items[0].contributions] == ["popularity"]
    category = loaded["items"][existing[0]]["attributes"]["category"]
    reply = client.stub.Recommend(pb.RecommendRequest(
        user_id="stranger", k=3, exclude_item_ids=[existing[0]],
        filters=[pb.Filter(attribute="category", equals=pb.AttributeValue(string_value=category))]))
    assert reply.items and existing[0] not in [it.item_id for it in reply.items]
    assert {it.attributes["category"].string_value for it in reply.items} == {category}


def test_upsert_rejects_bad_items_naming_item_and_field(client, loaded):
    code, details = _code(client.stub.UpsertItems, pb.UpsertItemsRequest(items=[
        pb.ItemInput(item_id="ok-1", content=pb.Content(text="fine")),
        pb.ItemInput(item_id="broken-1", content=pb.Content(text="fine", image=b"\xff\xd8\xff truncated"))]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "broken-1" in details and "content.image" in details
    assert _code(client.stub.GetItem, pb.GetItemRequest(item_id="ok-1"))[0] == grpc.StatusCode.NOT_FOUND  # all or nothing
    too_many = [pb.ItemInput(item_id=f"x{i}", content=pb.Content(text="t")) for i in range(1000)]
    assert _code(client.stub.UpsertItems, pb.UpsertItemsRequest(items=too_many))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_bring_your_own_vectors_must_match_the_encoder(client, service, loaded):
    version = service.info["encoder_versions"]["text"]
    vec = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    wrong = pb.ItemInput(item_id="byo-1", vectors=[pb.ModalityVector(modality="text", values=vec, encoder_version="other@9")])
    code, details = _code(client.stub.UpsertItems, pb.UpsertItemsRequest(items=[wrong]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and version in details
    right = pb.ItemInput(item_id="byo-1", vectors=[pb.ModalityVector(modality="text", values=vec, encoder_version=version)])
    assert client.stub.UpsertItems(pb.UpsertItemsRequest(items=[right])).upserted == 1
    assert list(client.stub.GetItem(pb.GetItemRequest(item_id="byo-1")).modalities) == ["text"]
    reply = client.stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["byo-1", "never-was"]))
    assert reply.deleted == 1 and list(reply.not_found) == ["never-was"]


def test_deleted_items_are_never_recommended(client, loaded):
    row = loaded["items"]["item-0020"]
    image = (loaded["dir"] / row["image"]).read_bytes()
    assert client.stub.Recommend(pb.RecommendRequest(query=pb.Content(image=image), k=1)).items[0].item_id == "item-0020"
    client.stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["item-0020"]))
    reply = client.stub.Recommend(pb.RecommendRequest(query=pb.Content(image=image), k=40))
    assert "item-0020" not in {i.item_id for i in reply.items}


def test_a_modality_that_misses_the_deadline_is_dropped_not_fatal(client, loaded, media_dir):
    user = loaded["events"][0]["user_id"]
    image = (media_dir / "images" / "astronaut.png").read_bytes()
    try:
        # The gateway keeps 50 ms (ranking_reserve_ms) for retrieval: the encoder gets ~5 ms, too little for a hop.
        reply = client.stub.Recommend(pb.RecommendRequest(user_id=user, k=3, query=pb.Content(image=image)), timeout=0.055)
    except grpc.RpcError as err:  # on a very busy machine retrieval itself can miss the remaining 50 ms
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        assert reply.degraded and [d.modality for d in reply.modalities_dropped] == ["image"]
        assert "deadline" in reply.modalities_dropped[0].reason
        assert reply.modalities_used == ["history"] and len(reply.items) == 3
    assert client.stub.Recommend(pb.RecommendRequest(user_id=user, k=3)).items


def test_new_fusion_model_hot_swaps_then_reindex_moves_the_store(service, client, loaded):
    """Runs last: swaps the fusion model of the shared service (no restart), then re-indexes."""
    from fusionrec.gateway.runtime import redeploy, reindex

    item_id = "item-0002"
    image = (loaded["dir"] / loaded["items"][item_id]["image"]).read_bytes()
    query = pb.RecommendRequest(query=pb.Content(image=image), k=3)
    before = client.stub.Recommend(query)
    new_model = {"name": "weighted-v0", "options": {"block_dim": 128, "weights": {"text": 1, "image": 2, "audio": 1}}}
    redeploy(default_config(), overrides={**service.overrides, "fusion": new_model})
    # Loaded, but requests keep the model the stored vectors were made with until re-indexed.
    assert client.stub.Recommend(query).model_version == before.model_version
    result = reindex()
    assert result["changed"] and result["items"] >= 30 and result["model_version"] != before.model_version
    after = client.stub.Recommend(query)
    assert after.model_version == result["model_version"]
    assert after.items[0].item_id == item_id
    assert client.stub.GetItem(pb.GetItemRequest(item_id=item_id)).model_version == result["model_version"]
    assert client.serving()


def test_a_trained_checkpoint_serves_recommend_with_its_towers(service, client, loaded, tmp_path):
    """Runs last: trains a tiny 2-net ensemble on the stored catalog vectors, swaps it in, re-indexes."""
    import torch
    from ray import serve

    from fusionrec.fusion.train.config import TrainConfig, get_variant
    from fusionrec.fusion.train.data import InteractionData
    from fusionrec.fusion.train.ensemble import EnsembleNet
    from fusionrec.fusion.train.export import export_payload, save_checkpoint
    from fusionrec.fusion.train.training import train
    from fusionrec.gateway.runtime import call_handle, redeploy, reindex

    names = sorted(loaded["items"])
    stored = call_handle(serve.get_deployment_handle("Retrieval", service.app_name), "get", names)
    names = [n for n in names if n in stored]
    index = {n: i for i, n in enumerate(names)}
    users = sorted({e["user_id"] for e in loaded["events"]})
    rows = np.array([(users.index(e["user_id"]), index[e["item_id"]]) for e in loaded["events"] if e["item_id"] in index])
    last = np.r_[rows[1:, 0] != rows[:-1, 0], True]  # each user's last event is held out
    features = {m: np.stack([stored[n].modality_vectors[m] for n in names]) for m in ("text", "image", "audio")}
    data = InteractionData("catalog", len(users), len(names), rows[~last], rows[last][:0], rows[last], features,
                           dict(service.info["encoder_versions"]), "last event per user")
    torch.set_num_threads(1)
    cfg = TrainConfig(block_dim=16, hidden=32, epochs=3, patience=3, batch_users=8)
    net = EnsembleNet([train(data, get_variant("full"), cfg, seed=s, progress=False).net for s in (0, 1)])
    payload = export_payload(net, data, "full", get_variant("full"), cfg, 0, {})
    payload["item_ids"] = [names[int(i)] for i in payload["item_ids"]]  # dataset rows -> catalog ids
    checkpoint = save_checkpoint(payload, tmp_path)

    redeploy(default_config(), overrides={**service.overrides,
                                        "fusion": {"name": "trained", "options": {"checkpoint": str(checkpoint)}}})
    assert reindex()["model_version"].startswith("trained@")
    user = users[0]
    reply = client.stub.Recommend(pb.RecommendRequest(user_id=user, k=5))
    assert reply.model_version.startswith("trained@") and len(reply.items) == 5
    seen = {e["item_id"] for e in loaded["events"] if e["user_id"] == user}
    assert not seen & {i.item_id for i in reply.items}
    for item in reply.items:
        parts = {c.modality: c.score for c in item.contributions}
        assert "id" in parts and sum(parts.values()) == pytest.approx(item.score, abs=1e-4)
    # A new item (an id the checkpoint never saw) borrows behaviour from known items with similar text.
    text = loaded["items"]["item-0003"]["text"]
    client.stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.ItemInput(
        item_id="brand-new", content=pb.Content(text=text),
        attributes={"batch": pb.AttributeValue(string_value="cold-start")})]))
    only_new = pb.Filter(attribute="batch", equals=pb.AttributeValue(string_value="cold-start"))
    (new,) = client.stub.Recommend(pb.RecommendRequest(user_id=user, k=1, filters=[only_new])).items
    parts = {c.modality: c.score for c in new.contributions}
    assert new.item_id == "brand-new" and abs(parts["id"]) > 1e-6, parts
    # A text query goes through the trained text head; this model was trained without images.
    assert client.stub.Recommend(pb.RecommendRequest(query=pb.Content(text=text), k=3)).items
    image = (loaded["dir"] / loaded["items"]["item-0003"]["image"]).read_bytes()
    code, details = _code(client.stub.Recommend, pb.RecommendRequest(query=pb.Content(image=image), k=3))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "trained@" in details


def test_status_command_from_another_process(service):
    """`fusionrec status` joins the running (loopback) Ray cluster: exit 0 while SERVING."""
    fusionrec = Path(sys.executable).with_name("fusionrec")
    done = subprocess.run([str(fusionrec), "status", "--target", service.target], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"health {service.target}: SERVING" in done.stdout
    assert "Retrieval" in done.stdout and "items stored:" in done.stdout
