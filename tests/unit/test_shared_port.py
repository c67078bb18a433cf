"""Two front doors on one port without Ray: SO_REUSEPORT when share_port, a refused bind without it, and
the port still answering new connections after one of the two servers is gone."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.gateway.config import ServerConfig
from fusionrec.gateway.metrics import Metrics, serve_metrics
from fusionrec.gateway.server import create_server, port_taken, set_serving
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from loop_support import LoopThread


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # a new connection each time
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.fixture
def loop():
    thread = LoopThread()
    thread.start()
    yield thread
    thread.loop.call_soon_threadsafe(thread.loop.stop)


def test_two_servers_share_the_port_and_one_left_keeps_answering(loop):
    cfg = ServerConfig(port=_free_port())
    assert not loop.call(port_taken(cfg.host, cfg.port))
    first, port, health1 = loop.call(create_server(pb_grpc.RecommenderServicer(), cfg))
    assert port == cfg.port and loop.call(port_taken(cfg.host, cfg.port))
    second, port2, health2 = loop.call(create_server(pb_grpc.RecommenderServicer(), cfg))
    assert port2 == port
    for health in (health1, health2):
        loop.call(set_serving(health, True))
    try:
        assert _check(port) == health_pb2.HealthCheckResponse.SERVING
        loop.call(first.stop(0))
        for _ in range(20):  # every new connection reaches the server left
            assert _check(port) == health_pb2.HealthCheckResponse.SERVING
    finally:
        loop.call(first.stop(0))
        loop.call(second.stop(0))
    assert not loop.call(port_taken(cfg.host, cfg.port))


def test_without_share_port_a_second_server_cannot_bind(loop):
    cfg = ServerConfig(port=_free_port(), share_port=False)
    server, _, _ = loop.call(create_server(pb_grpc.RecommenderServicer(), cfg))
    try:
        with pytest.raises(RuntimeError, match="(?i)bind"):
            loop.call(create_server(pb_grpc.RecommenderServicer(), cfg))
    finally:
        loop.call(server.stop(0))


def test_each_replica_gets_its_own_metrics_port_from_the_span():
    base = _free_port()
    endpoints = [serve_metrics(Metrics().registry, "127.0.0.1", base, span=4) for _ in range(2)]
    try:
        assert all(endpoints) and endpoints[0].port == base and base < endpoints[1].port < base + 4
    finally:
        for e in endpoints:
            if e is not None:
                e.stop()
