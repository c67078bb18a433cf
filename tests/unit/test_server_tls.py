"""The real front door over TLS and mutual TLS, with the token read from the environment (no Ray)."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from fusionrec.client import Client, ServiceError, UnauthenticatedError
from fusionrec.gateway.config import LimitsConfig, ServerConfig, StoreConfig, secret
from fusionrec.gateway.pipeline import Recommender
from fusionrec.gateway.server import create_server, server_credentials
from fusionrec.gateway.service import RecommenderServicer
from recommender_double_support import self_signed_cert
from loop_support import LoopThread


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return self_signed_cert(tmp_path_factory.mktemp("server")), self_signed_cert(tmp_path_factory.mktemp("caller"),
                                                                                 "caller")


@contextlib.contextmanager
def _front_door(cfg: ServerConfig):
    """The real server with no deployments behind it (health and auth answer before any handle); yields the target."""
    loop = LoopThread()
    loop.start()
    servicer = RecommenderServicer(Recommender({}, None, None, LimitsConfig(), cfg), cfg.default_deadline_ms)
    srv, port, _health = loop.call(create_server(servicer, cfg))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.call(srv.stop(0))


def test_tls_front_door_answers_tls_callers_and_refuses_plaintext(certs, monkeypatch):
    (cert, key), _ = certs
    monkeypatch.setenv("FUSIONREC_TEST_TOKEN", "s3cret")
    cfg = ServerConfig(port=0, tls_cert_file=str(cert), tls_key_file=str(key), auth_token_env="FUSIONREC_TEST_TOKEN")
    with _front_door(cfg) as target:
        with Client(target, token="s3cret", root_certs_path=cert, deadline_s=5) as good:
            assert good.health_status() == "NOT_SERVING"  # handshake done, health answers before start-up
        with Client(target, token="wrong", root_certs_path=cert, deadline_s=5) as bad:
            with pytest.raises(UnauthenticatedError):
                bad.get_item("item-1")
        plain = grpc.insecure_channel(target)
        with pytest.raises(grpc.FutureTimeoutError):  # plaintext never gets a working connection
            grpc.channel_ready_future(plain).result(timeout=2)
        plain.close()


def test_mutual_tls_requires_a_client_certificate(certs):
    (cert, key), (caller_cert, caller_key) = certs
    cfg = ServerConfig(port=0, tls_cert_file=str(cert), tls_key_file=str(key), tls_client_ca_file=str(caller_cert))
    with _front_door(cfg) as target:
        with Client(target, root_certs_path=cert, client_cert_path=caller_cert, client_key_path=caller_key,
                    deadline_s=5) as with_cert:
            assert with_cert.health_status() == "NOT_SERVING"
        with Client(target, root_certs_path=cert, deadline_s=3, retry_max_attempts=1) as without:
            with pytest.raises(ServiceError) as refused:
                without.health_status()
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_bad_tls_and_token_settings_fail_loudly(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(tls_cert_file="a.pem")
    with pytest.raises(ValueError, match="not both"):
        ServerConfig(auth_token="x", auth_token_env="Y")
    monkeypatch.delenv("FUSIONREC_UNSET_TOKEN", raising=False)
    with pytest.raises(ValueError, match="unset or empty"):
        ServerConfig(auth_token_env="FUSIONREC_UNSET_TOKEN").token()
    with pytest.raises(ValueError, match="store.token_env names 'FUSIONREC_UNSET_TOKEN'"):
        secret("", "FUSIONREC_UNSET_TOKEN", "store.token_env")
    monkeypatch.setenv("FUSIONREC_MILVUS_TOKEN", "root:Milvus")
    assert secret("", "FUSIONREC_MILVUS_TOKEN", "store.token_env") == "root:Milvus"
    with pytest.raises(ValueError, match="not both"):
        StoreConfig(token="a:b", token_env="FUSIONREC_MILVUS_TOKEN")
    with pytest.raises(ValueError, match="cannot read"):
        server_credentials(ServerConfig(tls_cert_file=str(tmp_path / "missing.pem"), tls_key_file="k.pem"))


def test_a_non_loopback_bind_needs_tls_and_a_token_or_an_explicit_allowance(certs):
    (cert, key), _ = certs
    with pytest.raises(ValueError, match="reach beyond loopback"):
        ServerConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="reach beyond loopback"):
        ServerConfig(host="0.0.0.0", tls_cert_file=str(cert), tls_key_file=str(key))  # TLS but no token
    with pytest.raises(ValueError, match="reach beyond loopback"):
        ServerConfig(metrics_host="0.0.0.0")
    ServerConfig(host="0.0.0.0", tls_cert_file=str(cert), tls_key_file=str(key), auth_token_env="T")
    ServerConfig(host="0.0.0.0", metrics_host="0.0.0.0", allow_insecure_bind=True)
