"""Request ids on the real Serve app: sent or generated, back in the answer and the trailer (failed
RPCs too), and one JSON access line per RPC in the Gateway replica's own log file."""

from __future__ import annotations

import glob
import json
import os
import re
import time

import grpc
import pytest

from fusionrec.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration
KEY = "x-request-id"


def _gateway_logs(app_name: str) -> list[str]:
    """The Gateway replicas' log files under this Ray session's log dir (logs/serve/replica_<app>_Gateway_*.log)."""
    import ray

    logs_dir = ray._private.worker._global_node.get_logs_dir_path()  # the session that start() began
    return glob.glob(os.path.join(logs_dir, "serve", f"replica_{app_name}_Gateway_*.log"))


def _access_line(app_name: str, request_id: str, wait_s: float = 15) -> dict:
    """The access line of ``request_id``, parsed: the grep recipe of the README, in Python. A refused
    RPC's status can reach the caller just before the server's handler unwinds and logs it."""
    needle = f'"request_id":"{request_id}"'
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for path in _gateway_logs(app_name):
            with open(path, errors="replace") as fh:
                found += [json.loads(line) for line in fh if needle in line]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(found) == 1, f"{len(found)} lines for {request_id} in {_gateway_logs(app_name)}"
    return found[0]


def test_a_sent_id_comes_back_and_its_line_is_in_the_gateway_log(service, client, loaded):
    user = loaded["events"][0]["user_id"]
    response, call = client.stub.Recommend.with_call(
        pb.RecommendRequest(user_id=user, query=pb.Content(text="a calm photo of a cat"), k=4),
        metadata=((KEY, "it-req-1"),), timeout=60)
    assert response.request_id == "it-req-1" == dict(call.trailing_metadata())[KEY]
    line = _access_line(service.app_name, "it-req-1")
    assert line["logger"] == "fusionrec.access" and line["method"] == "Recommend" and line["code"] == "OK"
    assert line["k"] == 4 and line["results"] == len(response.items)
    assert line["degraded"] == response.degraded and line["duration_ms"] > 0
    assert line["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))


def test_an_id_is_generated_when_none_is_sent(service, client, loaded):
    response, call = client.stub.Recommend.with_call(pb.RecommendRequest(user_id="nobody-yet", k=3), timeout=60)
    assert re.fullmatch(r"[0-9a-f]{32}", response.request_id)
    assert dict(call.trailing_metadata())[KEY] == response.request_id
    assert _access_line(service.app_name, response.request_id)["results"] == len(response.items)


def test_an_invalid_argument_carries_the_id_and_is_logged(service, client, loaded):
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Recommend(pb.RecommendRequest(user_id="u", k=100_000), metadata=((KEY, "it-bad-k"),), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())[KEY] == "it-bad-k"
    line = _access_line(service.app_name, "it-bad-k")
    assert line["code"] == "INVALID_ARGUMENT" and line["error"] == info.value.details()


def test_an_invalid_sent_id_is_refused_with_a_generated_one(service, client, loaded):
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Recommend(pb.RecommendRequest(user_id="u", k=3), metadata=((KEY, "two words"),), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and KEY in info.value.details()
    generated = dict(info.value.trailing_metadata())[KEY]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert _access_line(service.app_name, generated)["code"] == "INVALID_ARGUMENT"
