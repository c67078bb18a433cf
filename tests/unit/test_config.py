"""Typed config: the shipped Serve config parses, mistakes fail loudly."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fusionrec.encoders.registry import ENCODERS, encoder_class
from fusionrec.gateway.app import build_app
from fusionrec.gateway.config import AppConfig, load_serve_file
from fusionrec.core.paths import default_config, packaged_config


@pytest.mark.parametrize("name", ["gpu.yaml"])
def test_other_shipped_configs_build(name):
    serve_file = load_serve_file(packaged_config(name))
    build_app(serve_file.applications[0]["args"])


def test_shipped_config_parses_and_builds():
    serve_file = load_serve_file(default_config())
    cfg = serve_file.app_config()
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 9000
    assert serve_file.proxy_location == "Disabled"
    assert set(cfg.encoders) == {"text", "image", "audio"}
    assert all(name in ENCODERS for name in (e.name for e in cfg.encoders.values()))
    build_app(serve_file.applications[0]["args"])


@pytest.mark.parametrize("bad, fragment", [
    ({"server": {"prot": 1}}, "Extra inputs are not permitted"),
    ({"encoders": {"smell": {"name": "x"}}}, "unknown modalities"),
    ({"deployments": {"retrieval": {"max_replicas": 2}}}, "one owner process"),
    ({"deployments": {"text_encoder": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas"),
    ({"precomputed_modalities": {"text": 3}}, "clash"),
])
def test_bad_config_is_rejected(bad, fragment):
    with pytest.raises(ValidationError, match=fragment):
        AppConfig.model_validate(bad)


def test_milvus_server_uri_allows_retrieval_replicas():
    cfg = AppConfig.model_validate({"store": {"uri": "http://milvus:19530"},
                                    "deployments": {"retrieval": {"max_replicas": 3}}})
    assert not cfg.store.is_lite


def test_unknown_encoder_fails_loudly():
    with pytest.raises(ValueError, match="known encoders"):
        encoder_class("clip-vit")
