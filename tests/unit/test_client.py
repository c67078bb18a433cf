"""fusionrec.client: Python values -> messages (checked against the gateway's own reading of them), the
options and service config it gives gRPC, and those options at work over real gRPC on loopback: retries,
default deadlines, auth over plaintext and TLS, typed errors; the sync and asyncio clients alike."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import grpc
import pytest
from pydantic import ValidationError

from fusionrec.client import (AsyncClient, Client, ClientOptions, DeadlineExceededError, InvalidArgumentError,
                              NotFoundError, Range, UnauthenticatedError, UnavailableError, filters_to_pb,
                              interaction, item, proto_path, recommend_request, value_from_pb)
from fusionrec.client.options import IDEMPOTENT_METHODS, channel_options
from fusionrec.gateway.convert import filter_from_pb
from fusionrec.v1 import recommender_pb2 as pb

from recommender_double_support import InMemoryRecommender, self_signed_cert, serving


def _read(flt: pb.Filter) -> tuple:
    spec = filter_from_pb(flt)  # what the gateway makes of it
    return spec.attribute, spec.equals, spec.min, spec.max, spec.in_set


# ---------- filters and content from Python values ----------

def test_filters_from_python_values_mean_what_the_gateway_reads():
    got = [_read(f) for f in filters_to_pb({"mood": "calm", "year": (2000, 2015), "category": {"horse", "cat"},
                                            "explicit": False, "price": 10, "rank": (None, 3),
                                            "stars": Range(min=4), "tag": ["b", "a", "b"]})]
    assert got == [("mood", "calm", None, None, None), ("year", None, 2000.0, 2015.0, None),
                   ("category", None, None, None, ["cat", "horse"]), ("explicit", False, None, None, None),
                   ("price", 10.0, None, None, None), ("rank", None, None, 3.0, None),
                   ("stars", None, 4.0, None, None), ("tag", None, None, None, ["a", "b"])]


def test_bool_filters_stay_bools_and_mixed_sets_keep_each_kind():
    (flt,) = filters_to_pb({"explicit": True})
    assert flt.equals.WhichOneof("kind") == "bool_value"
    (mixed,) = filters_to_pb({"code": {3, "x", True}})
    assert [v.WhichOneof("kind") for v in mixed.in_set.values] == ["bool_value", "number_value", "string_value"]


@pytest.mark.parametrize("filters, error", [
    ({"year": (2000, 2010, 2020)}, ValueError), ({"year": (None, None)}, ValueError),
    ({"year": (2015, 2000)}, ValueError), ({"year": ("a", 3)}, ValueError), ({"year": (True, 3)}, ValueError),
    ({"category": set()}, ValueError), ({"price": math.nan}, ValueError), ({"price": {"min": 1}}, TypeError),
    ({"price": None}, TypeError), ({"": 1}, ValueError), ([{"mood": "calm"}], TypeError)])
def test_filters_that_cannot_be_a_filter_are_refused_before_sending(filters, error):
    with pytest.raises(error):
        filters_to_pb(filters)


def test_filter_messages_pass_through_as_they_are():
    flt = pb.Filter(attribute="year", range=pb.NumericRange(min=1))
    assert filters_to_pb([flt]) == [flt] and filters_to_pb(None) == []


def test_media_is_bytes_or_a_file_path(tmp_path):
    (tmp_path / "q.jpg").write_bytes(b"\xff\xd8jpeg")
    by_path = recommend_request("u", text="t", image=tmp_path / "q.jpg", audio=str(tmp_path / "q.jpg"))
    assert by_path.query.image == by_path.query.audio == b"\xff\xd8jpeg" and by_path.query.text == "t"
    assert recommend_request(image=bytearray(b"abc")).query.image == b"abc"
    with pytest.raises(FileNotFoundError):
        recommend_request(image=tmp_path / "missing.jpg")
    with pytest.raises(TypeError):
        recommend_request(image=42)


def test_items_and_interactions_from_python_values():
    it = item("sku-1", text="a cat", image=b"img", attributes={"year": 2019, "explicit": False, "mood": "calm"},
              vectors={"audio": [0.5, 1], "clip": {"values": [1.0], "encoder_version": "clip-v1"}})
    assert {k: value_from_pb(v) for k, v in it.attributes.items()} == {"year": 2019.0, "explicit": False,
                                                                        "mood": "calm"}
    assert [(v.modality, list(v.values), v.encoder_version) for v in it.vectors] == [
        ("audio", [0.5, 1.0], ""), ("clip", [1.0], "clip-v1")]
    assert it.content.image == b"img"
    assert interaction("u", "i", "like", 5) == pb.Interaction(user_id="u", item_id="i", kind="like", timestamp_s=5)
    assert interaction("u", "i", event_id="e-1").event_id == "e-1"


def test_the_proto_ships_beside_the_generated_code():
    path = proto_path()
    assert path.name == "recommender.proto" and "service Recommender" in path.read_text()
    assert (path.parents[2] / "fusionrec" / "v1" / "recommender.proto").is_file()  # the protoc -I root


# ---------- options and the service config ----------

def _service_config(options: ClientOptions) -> dict:
    return json.loads(dict(channel_options(options))["grpc.service_config"])


def test_service_config_retries_unavailable_on_idempotent_methods_only():
    config = _service_config(ClientOptions(retry_max_attempts=3, retry_initial_backoff_s=0.05))
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == set(IDEMPOTENT_METHODS)
    assert ("fusionrec.v1.Recommender", "RecordInteractions") not in names
    assert method_config["retryPolicy"] == {"maxAttempts": 3, "initialBackoff": "0.050s", "maxBackoff": "5.000s",
                                            "backoffMultiplier": 2.0, "retryableStatusCodes": ["UNAVAILABLE"]}
    assert config["loadBalancingConfig"] == [{"round_robin": {}}] and config["retryThrottling"]["maxTokens"] == 10
    assert "methodConfig" not in _service_config(ClientOptions(retry_max_attempts=1))


def test_channel_options_enable_retries_keepalive_and_idle_reconnects():
    args = dict(channel_options(ClientOptions(keepalive_time_s=400, idle_timeout_s=60, max_message_mb=8,
                                              tls_server_name="svc.internal", retry_buffer_mb=4)))
    assert args["grpc.enable_retries"] == 1 and args["grpc.per_rpc_retry_buffer_size"] == 4 << 20
    assert args["grpc.keepalive_time_ms"] == 400_000 and args["grpc.keepalive_permit_without_calls"] == 0
    assert args["grpc.client_idle_timeout_ms"] == 60_000
    assert args["grpc.max_send_message_length"] == args["grpc.max_receive_message_length"] == 8 << 20
    assert args["grpc.ssl_target_name_override"] == "svc.internal"


@pytest.mark.parametrize("bad", [{"retryable_codes": ("UNAVAILBLE",)}, {"retry_max_attempts": 6},
                                 {"deadline_s": 0}, {"client_cert_path": "c.pem"}, {"colour": "red"}])
def test_options_are_checked(bad):
    with pytest.raises(ValidationError):
        ClientOptions(**bad)


def test_default_deadlines_by_method_and_the_token_is_not_in_the_repr():
    options = ClientOptions(token="s3cret", deadline_s=2, write_deadline_s=90)
    assert options.deadline_for("/fusionrec.v1.Recommender/Recommend") == 2
    assert options.deadline_for("/fusionrec.v1.Recommender/UpsertItems") == 90
    assert options.deadline_for("/grpc.health.v1.Health/Check") == 2
    assert "s3cret" not in repr(options)


# ---------- over real gRPC ----------

def test_unavailable_is_retried_on_reads_and_upserts_but_not_on_interactions():
    service = InMemoryRecommender()
    with serving(service) as target, Client(target, retry_initial_backoff_s=0.01) as client:
        service.fail_next.update({"UpsertItems": 2, "GetItem": 3, "RecordInteractions": 1})
        assert client.upsert_items([item("a", text="x")]).upserted == 1
        assert client.get_item("a").item_id == "a"
        assert service.attempts["UpsertItems"] == 3 and service.attempts["GetItem"] == 4
        with pytest.raises(UnavailableError) as err:
            client.record_interactions([interaction("u", "a")])
        assert service.attempts["RecordInteractions"] == 1 and not service.events
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "restarting" in err.value.message


def test_with_retries_off_the_first_unavailable_is_the_answer():
    service = InMemoryRecommender()
    with serving(service) as target, Client(target, retry_max_attempts=1) as client:
        service.fail_next["GetItem"] = 1
        with pytest.raises(UnavailableError):
            client.get_item("a")
        assert service.attempts["GetItem"] == 1


def test_calls_without_a_deadline_get_the_default_one_raw_stub_included():
    service = InMemoryRecommender()
    service.release.clear()  # Recommend blocks until released
    with serving(service) as target, Client(target, deadline_s=0.3) as client:
        with pytest.raises(DeadlineExceededError):
            client.recommend("u", k=1)
        with pytest.raises(grpc.RpcError) as raw:
            client.stub.Recommend(pb.RecommendRequest(user_id="u", k=1))
        assert raw.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        service.release.set()
        assert client.recommend("u", k=1, timeout_s=10).request_id == "req-1"


def test_typed_errors_carry_code_and_message_and_stored_ids_checks_many():
    service = InMemoryRecommender()
    with serving(service) as target, Client(target) as client:
        client.upsert_items([item("a", text="x"), item("b", text="y")])
        with pytest.raises(NotFoundError) as err:
            client.get_item("zz")
        assert err.value.code == grpc.StatusCode.NOT_FOUND and str(err.value) == "GetItem: NOT_FOUND: no item 'zz'"
        with pytest.raises(InvalidArgumentError):
            client.upsert_items([item("c", text="reject me")])
        assert client.stored_ids([f"id-{i}" for i in range(40)] + ["b", "a"]) == {"a", "b"}
        assert client.delete_items(["a", "nope"]).not_found == ["nope"]
        assert client.health_status() == "SERVING" and client.serving()


def test_plaintext_sends_the_token_as_metadata_on_every_call():
    service = InMemoryRecommender()
    with serving(service) as target, Client(target, token="s3cret") as client:
        client.upsert_items([item("a", text="x")])
        client.stub.GetItem(pb.GetItemRequest(item_id="a"))  # the raw stub too
        client.stub.GetItem(pb.GetItemRequest(item_id="a"), metadata=client.metadata)  # not twice
    assert [m["authorization"] for m in service.metadata] == ["Bearer s3cret"] * 3


def test_tls_with_the_token_as_call_credentials(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    service = InMemoryRecommender()
    with serving(service, creds) as target:
        with Client(target, token="s3cret", root_certs_path=cert, tls_server_name="localhost") as client:
            assert client.metadata == ()  # the credentials carry the token
            assert client.upsert_items([item("a", text="x")]).upserted == 1
        assert service.metadata[-1]["authorization"] == "Bearer s3cret"
        with Client(target, retry_max_attempts=1) as plaintext:  # a TLS port refuses a plaintext client
            assert not plaintext.serving(timeout_s=2)


def test_the_gateway_front_door_refuses_a_missing_token_and_admits_the_client_with_one():
    """The real grpc.aio front door (auth interceptor, validation) without Ray behind it."""
    from fusionrec.gateway.config import LimitsConfig, ServerConfig
    from fusionrec.gateway.pipeline import Recommender
    from fusionrec.gateway.server import create_server
    from fusionrec.gateway.service import RecommenderServicer

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cfg = ServerConfig(host="127.0.0.1", port=0, auth_token="s3cret")
    servicer = RecommenderServicer(Recommender({}, None, None, LimitsConfig(), cfg), cfg.default_deadline_ms)
    server, port, health_servicer = asyncio.run_coroutine_threadsafe(create_server(servicer, cfg), loop).result(30)
    health_servicer.started = True
    try:
        with Client(f"127.0.0.1:{port}") as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.recommend("u", k=0)
        with Client(f"127.0.0.1:{port}", token="s3cret") as client, pytest.raises(InvalidArgumentError) as err:
            client.recommend("u", k=100_000)  # past auth: validation answers
        assert "k must be between" in err.value.message
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


def test_async_client_same_calls_same_errors():
    service = InMemoryRecommender()

    async def run(target: str) -> None:
        async with AsyncClient(target, token="t", retry_initial_backoff_s=0.01) as client:
            service.fail_next["UpsertItems"] = 1
            assert (await client.upsert_items([item("a", text="x")])).upserted == 1
            assert [i.item_id for i in (await client.recommend("u", k=5, filters={"year": (1, 2)})).items] == ["a"]
            assert await client.stored_ids(["a", "b"]) == {"a"}
            with pytest.raises(NotFoundError):
                await client.get_item("b")
            assert await client.serving()

    with serving(service) as target:
        asyncio.run(run(target))
    assert service.attempts["UpsertItems"] == 2 and service.metadata[0]["authorization"] == "Bearer t"
