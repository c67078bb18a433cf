"""The ranking stage in the served path: with a trained ranker configured (the Retrieval user_config's
ranking), Recommend over real gRPC follows the ranker; without one it is the search's order. The ranker is
applied to the running replicas and taken away again, with no replica restarted."""

from __future__ import annotations

import time

import pytest
from grpc_health.v1 import health_pb2

from fusionrec.core.paths import default_config
from fusionrec.gateway.runtime import replica_ids
from fusionrec.v1 import recommender_pb2 as pb
from ranking_support import train_popularity_ranker

pytestmark = pytest.mark.integration


def _recommend(client, user_id: str, k: int, *filters: pb.Filter) -> list[pb.ScoredItem]:
    reply = client.stub.Recommend(pb.RecommendRequest(user_id=user_id, k=k, filters=list(filters)), timeout=60)
    return list(reply.items)


def _shares(client) -> dict[str, float]:
    """Each item's share of recorded interactions, from what a user with no history gets (popular items)."""
    return {it.item_id: it.score for it in _recommend(client, "ranking-test-nobody", 200)}


def _redeploy_and_wait(client, overrides: dict) -> None:
    """Apply ``overrides`` (Serve updates the deployments whose settings changed) and wait
    until the front door answers SERVING."""
    from fusionrec.gateway.runtime import redeploy

    redeploy(default_config(), overrides=overrides)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if client.health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except Exception:  # the Gateway replica is restarting
            pass
        time.sleep(0.5)
    raise AssertionError("the app did not answer SERVING within 300 s of the redeploy")


def _non_increasing(values: list[float]) -> bool:
    return all(a >= b - 1e-9 for a, b in zip(values, values[1:]))


def test_recommend_follows_a_configured_ranker(service, client, loaded, tmp_path):
    user = loaded["events"][0]["user_id"]
    seen = {e["item_id"] for e in loaded["events"] if e["user_id"] == user}
    plain = _recommend(client, user, 8)
    shares = _shares(client)
    unseen = {i: s for i, s in shares.items() if i not in seen}
    assert not _non_increasing([shares[it.item_id] for it in plain])  # retrieval alone is not popularity order

    path = tmp_path / "popularity-ranker.json"
    train_popularity_ranker(path)
    before = replica_ids(service.app_name)
    _redeploy_and_wait(client, {**service.overrides, "ranking": {"ranker_path": str(path), "candidates_n": 200}})
    try:
        during = replica_ids(service.app_name)
        ranked = _recommend(client, user, 8)
        calm = pb.Filter(attribute="mood", equals=pb.AttributeValue(string_value="calm"))
        filtered = _recommend(client, user, 4, calm)
    finally:
        _redeploy_and_wait(client, service.overrides)
    after = replica_ids(service.app_name)
    for name in ("Retrieval", "Fusion", "Gateway"):  # applied in place: none restarted (encoders may autoscale)
        assert during[name] == before[name] == after[name], name

    got = [it.item_id for it in ranked]
    assert len(got) == 8 and not set(got) & seen
    assert _non_increasing([shares[i] for i in got]), [(i, shares[i]) for i in got]
    assert shares[got[0]] == max(unseen.values())  # the most popular unseen item leads
    assert got != [it.item_id for it in plain]
    assert _non_increasing([it.score for it in ranked])
    for it in ranked:  # still explainable per modality
        assert {c.modality for c in it.contributions} >= {"text", "image"}
    assert filtered and all(it.attributes["mood"].string_value == "calm" for it in filtered)
    assert _non_increasing([shares[it.item_id] for it in filtered])

    after = _recommend(client, user, 8)  # the ranker is gone again: the search's order, as before
    assert [it.item_id for it in after] == [it.item_id for it in plain]
