"""Request ids and the JSON access log through the real front door and pipeline over the in-process
app (local_app_support.py): the id in the answer and the trailer of every RPC, refused ones
included, and one findable JSON line per RPC, sampled except for failed and degraded ones."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import re
import time

import grpc
import pytest
from ray.serve.exceptions import BackPressureError

from fusionrec.gateway import requestlog
from fusionrec.gateway.config import ServerConfig
from fusionrec.gateway.requestlog import (MAX_REQUEST_ID_CHARS, REQUEST_ID_KEY, current_request_id,
                                          request_id_problem, serve_log_file, write_to)
from fusionrec.gateway.server import create_server
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc

from local_app_support import LocalApp
from loop_support import LoopThread

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    local = LocalApp(tmp_path_factory.mktemp("request_ids"))
    yield local
    local.close()


@contextlib.contextmanager
def _access_file(path):
    """Access lines appended to ``path`` for the duration, as in a Gateway replica."""
    handler = write_to(str(path))
    try:
        yield path
    finally:
        requestlog.access_log.removeHandler(handler)
        handler.close()
        requestlog.access_log.propagate = True


def _lines(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _line_for(path, request_id: str, wait_s: float = 10) -> dict:
    """The one line of ``request_id``. An aborted RPC's status reaches the caller before the server's
    handler unwinds (and logs), so a refused call's line may land just after the caller saw the error."""
    deadline = time.monotonic() + wait_s
    while not (found := [line for line in _lines(path) if line["request_id"] == request_id]):
        if time.monotonic() > deadline:
            raise AssertionError(f"no access line for {request_id!r} in {path}")
        time.sleep(0.05)
    assert len(found) == 1, found
    return found[0]


def _trailer(call_or_error) -> str:
    return dict(call_or_error.trailing_metadata())[REQUEST_ID_KEY]


@pytest.fixture(scope="module")
def served(app, tmp_path_factory):
    path = tmp_path_factory.mktemp("access") / "replica_fusionrec_Gateway_x.log"
    with _access_file(path), app.serving(ServerConfig()) as stub:
        app.load_items(stub)
        yield stub, path


def test_a_sent_id_comes_back_in_the_answer_the_trailer_and_the_log(served):
    stub, path = served
    response, call = stub.Recommend.with_call(pb.RecommendRequest(user_id="u-1", query=pb.Content(text="a cat"), k=3),
                                              metadata=((REQUEST_ID_KEY, "req-abc.1"),))
    assert response.request_id == "req-abc.1" == _trailer(call)
    line = _line_for(path, "req-abc.1")
    assert line["logger"] == "fusionrec.access" and line["method"] == "Recommend" and line["code"] == "OK"
    assert line["k"] == 3 and line["results"] == len(response.items) == 3
    assert line["degraded"] is False and line["dropped"] == {} and "error" not in line
    assert line["duration_ms"] > 0 and line["peer"].startswith(("ipv4:", "ipv6:"))
    assert "trace_id" not in line  # no exporter configured: nothing to point at


def test_an_id_is_generated_when_none_is_sent(served):
    stub, path = served
    ids = []
    for _ in range(2):
        response, call = stub.Recommend.with_call(pb.RecommendRequest(user_id="u-1", k=2))
        assert GENERATED.fullmatch(response.request_id) and _trailer(call) == response.request_id
        ids.append(response.request_id)
        assert _line_for(path, response.request_id)["code"] == "OK"
    assert ids[0] != ids[1]


def test_other_rpcs_carry_the_id_too(served):
    stub, path = served
    item, call = stub.GetItem.with_call(pb.GetItemRequest(item_id="item-0"), metadata=((REQUEST_ID_KEY, "get-1"),))
    assert item.item_id == "item-0" and _trailer(call) == "get-1"
    _, call = stub.RecordInteractions.with_call(
        pb.RecordInteractionsRequest(interactions=[pb.Interaction(user_id="u-2", item_id="item-1")]))
    line = _line_for(path, _trailer(call))
    assert line["method"] == "RecordInteractions" and line["interactions"] == 1 and line["recorded"] == 1


@pytest.mark.parametrize("request_, code", [
    (pb.RecommendRequest(user_id="u-1", k=100_000), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_failed_rpcs_carry_the_id_and_are_logged_with_their_error(served, request_, code):
    stub, path = served
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(request_, metadata=((REQUEST_ID_KEY, f"fail-{request_.k}"),))
    assert info.value.code() == code and _trailer(info.value) == f"fail-{request_.k}"
    line = _line_for(path, f"fail-{request_.k}")
    assert line["code"] == code.name and line["error"] == info.value.details()
    assert "results" not in line


def test_not_found_is_logged(served):
    stub, path = served
    with pytest.raises(grpc.RpcError) as info:
        stub.GetItem(pb.GetItemRequest(item_id="no-such-item"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert _line_for(path, _trailer(info.value))["code"] == "NOT_FOUND"


@pytest.mark.parametrize("sent", ["has space", "x" * (MAX_REQUEST_ID_CHARS + 1)], ids=["space", "too-long"])
def test_an_invalid_sent_id_is_refused_and_replaced_in_the_trailer(served, sent):
    stub, path = served
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(pb.RecommendRequest(user_id="u-1", k=2), metadata=((REQUEST_ID_KEY, sent),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert REQUEST_ID_KEY in info.value.details() and f"1-{MAX_REQUEST_ID_CHARS}" in info.value.details()
    generated = _trailer(info.value)
    assert GENERATED.fullmatch(generated)
    assert _line_for(path, generated)["code"] == "INVALID_ARGUMENT"


def test_the_longest_valid_id_is_kept(served):
    stub, _ = served
    longest = "~" + "a" * (MAX_REQUEST_ID_CHARS - 2) + "!"
    response = stub.Recommend(pb.RecommendRequest(user_id="u-1", k=1), metadata=((REQUEST_ID_KEY, longest),))
    assert response.request_id == longest


def test_sampling_keeps_every_failed_and_degraded_rpc(app, tmp_path):
    # Rate 0: only what is always logged. A ranking reserve longer than any deadline drops every query
    # modality before encoding: a degraded answer (popular items).
    cfg = ServerConfig(access_log_sample_rate=0.0, ranking_reserve_ms=3_600_000)
    with _access_file(tmp_path / "access.log") as path, app.serving(cfg) as stub:
        ok = stub.Recommend(pb.RecommendRequest(user_id="u-1", k=2))
        degraded = stub.Recommend(pb.RecommendRequest(user_id="u-1", query=pb.Content(text="a cat"), k=2))
        with pytest.raises(grpc.RpcError) as info:
            stub.Recommend(pb.RecommendRequest(k=2))
        _line_for(path, _trailer(info.value))  # written by now
    logged = {line["request_id"]: line for line in _lines(path)}
    assert ok.request_id not in logged and not ok.degraded
    assert degraded.degraded and logged[degraded.request_id]["degraded"] is True
    assert logged[degraded.request_id]["dropped"] == {"text": "deadline reached before encoding"}
    assert logged[_trailer(info.value)]["code"] == "INVALID_ARGUMENT"
    assert len(logged) == 2


def test_refusals_before_the_servicer_carry_the_id(app):
    with app.serving(ServerConfig(auth_token="s3cret")) as stub:
        with pytest.raises(grpc.RpcError) as info:
            stub.Recommend(pb.RecommendRequest(user_id="u-1"), metadata=((REQUEST_ID_KEY, "no-token"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and _trailer(info.value) == "no-token"


class _Failing(pb_grpc.RecommenderServicer):
    async def GetItem(self, request, context):
        raise BackPressureError(num_queued_requests=8, max_queued_requests=8)  # Serve's own, from a handle

    async def DeleteItems(self, request, context):
        raise RuntimeError("a bug")


@contextlib.contextmanager
def _front_door(servicer):
    loop = LoopThread()
    loop.start()
    server, port, health = loop.call(create_server(servicer, ServerConfig(port=0)))
    health.started = True
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.RecommenderStub(channel)
    finally:
        loop.call(server.stop(0))
        loop.loop.call_soon_threadsafe(loop.loop.stop)


def test_retry_advice_and_the_id_share_the_trailer():
    with _front_door(_Failing()) as stub, pytest.raises(grpc.RpcError) as info:
        stub.GetItem(pb.GetItemRequest(item_id="x"), metadata=((REQUEST_ID_KEY, "shed-1"),))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailer = dict(info.value.trailing_metadata())
    assert trailer[REQUEST_ID_KEY] == "shed-1" and trailer["grpc-retry-pushback-ms"] == "500"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_traceback_behind_internal_names_the_request_id():
    records = _Records()
    logging.getLogger("ray.serve").addHandler(records)  # what lands in the replica's log file
    try:
        with _front_door(_Failing()) as stub, pytest.raises(grpc.RpcError) as info:
            stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["a"]), metadata=((REQUEST_ID_KEY, "bug-1"),))
    finally:
        logging.getLogger("ray.serve").removeHandler(records)
    assert info.value.code() == grpc.StatusCode.INTERNAL and _trailer(info.value) == "bug-1"
    (record,) = records.records
    assert "bug-1" in record.getMessage() and record.exc_info[0] is RuntimeError


def test_request_id_rules():
    assert request_id_problem("abc-DEF_1.2:3/4") is None
    assert request_id_problem("~" * MAX_REQUEST_ID_CHARS) is None
    for bad in ("", " ", "a b", "é", "x" * (MAX_REQUEST_ID_CHARS + 1), "a\nb"):
        assert request_id_problem(bad), bad


def test_outside_an_rpc_every_call_gets_a_fresh_id():
    first, second = current_request_id(), current_request_id()
    assert GENERATED.fullmatch(first) and first != second


def test_the_log_file_is_found_through_serves_logger_and_survives_rotation(tmp_path):
    from ray.serve._private.logging_utils import configure_component_logger
    from ray.serve.schema import LoggingConfig

    serve_logger = logging.getLogger("ray.serve")
    saved = (list(serve_logger.handlers), serve_logger.propagate, serve_logger.level)
    try:  # Serve's own set-up of a component's logger (what a replica gets), into tmp_path
        configure_component_logger(component_name="fusionrec_Gateway", component_id="r1",
                                   logging_config=LoggingConfig(logs_dir=str(tmp_path)), max_bytes=1 << 20,
                                   backup_count=1)
        path = serve_log_file()
        assert path is not None and os.path.dirname(path) == str(tmp_path)
        with _access_file(path):
            serve_logger.info("a Serve line")
            requestlog.access_log.info('{"request_id":"before"}')
            (memory,) = [h for h in serve_logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]
            memory.target.doRollover()  # Serve rotates: the file becomes .1, a new one opens
            requestlog.access_log.info('{"request_id":"after"}')  # ...and so do we
        with open(path) as fh:
            assert fh.read().strip() == '{"request_id":"after"}'
        with open(path + ".1") as fh:
            lines = fh.read().splitlines()
        assert lines[0].endswith("a Serve line") and lines[1] == '{"request_id":"before"}'
    finally:
        for handler in serve_logger.handlers:
            handler.close()
        serve_logger.handlers[:] = saved[0]
        serve_logger.propagate, serve_logger.level = saved[1], saved[2]
    assert serve_log_file("no.such.logger") is None

