"""RecordInteractions over gRPC against the real Serve app: a retried event id is not recorded twice,
and timestamps beyond the configured skew into the future (or absurdly old) are refused."""

from __future__ import annotations

import time

import grpc
import pytest

from fusionrec.client import interaction
from fusionrec.client.errors import InvalidArgumentError
from fusionrec.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration


def _catalog_ids(client, n: int) -> list[str]:
    reply = client.stub.Recommend(pb.RecommendRequest(user_id="semantics-cold-user", k=n))
    ids = [it.item_id for it in reply.items]
    assert len(ids) == n
    return ids


def test_a_retried_event_id_is_recorded_once(client, loaded):
    a, b = _catalog_ids(client, 2)
    user = "semantics-user-1"
    events = [interaction(user, a, "view", event_id="ev-1"), interaction(user, b, "like", event_id="ev-2"),
              interaction(user, b, "like", event_id="ev-2")]  # repeated inside the batch
    first = client.record_interactions(events)
    assert (first.recorded, first.duplicates) == (2, 1)
    retry = client.stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=events))
    assert (retry.recorded, retry.duplicates) == (0, 3)
    plain = client.record_interactions([interaction(user, a, "view"), interaction(user, a, "view")])
    assert (plain.recorded, plain.duplicates) == (2, 0)  # no event id: appended, as before
    seen = client.stub.Recommend(pb.RecommendRequest(user_id=user, k=10))
    assert "history" in seen.modalities_used and not {a, b} & {it.item_id for it in seen.items}


def test_a_timestamp_from_the_future_is_refused_and_nothing_of_the_batch_is_recorded(client, loaded):
    (a,) = _catalog_ids(client, 1)
    user = "semantics-user-2"
    good = interaction(user, a, "view", timestamp_s=time.time() - 60, event_id="good")
    year_9999 = interaction(user, a, "view", timestamp_s=253_402_300_799.0)
    with pytest.raises(grpc.RpcError) as info:
        client.stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=[good, year_9999]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interactions[1].timestamp_s" in info.value.details()
    assert "limits.max_future_skew_s = 300 s" in info.value.details()
    with pytest.raises(InvalidArgumentError, match="limits.min_timestamp_s"):
        client.record_interactions([interaction(user, a, "view", timestamp_s=12.0)])
    reply = client.record_interactions([good])  # the refused batch recorded nothing: "good" is new
    assert (reply.recorded, reply.duplicates) == (1, 0)
