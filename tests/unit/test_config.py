"""Typed config: the shipped Serve config parses, mistakes fail loudly."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fusionrec.encoders.registry import ENCODERS, encoder_class
from fusionrec.core.paths import default_config, packaged_config
from fusionrec.gateway.app import build_app, deployment_options
from fusionrec.gateway.config import AppConfig, check_deployment_overrides, load_serve_file
from fusionrec.gateway.runtime import render_config


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
    ({"precomputed_modalities": {"text": 3}}, "clash"),
    ({"deployments": {"retrieval": {"max_replicas": 2}}}, "Extra inputs are not permitted"),  # Serve's list now
    ({"store": {"ranking": {"ranker_path": "r.json"}}}, "moved to the Retrieval deployment's user_config"),
])
def test_bad_config_is_rejected(bad, fragment):
    with pytest.raises(ValidationError, match=fragment):
        AppConfig.model_validate(bad)


@pytest.mark.parametrize("override, fragment", [
    ({"name": "Retrieval", "num_replicas": 2}, "one owner process"),
    ({"name": "Retrieval", "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}, "one owner process"),
    ({"name": "TextEncoders", "num_replicas": 1}, "unknown deployment 'TextEncoders'"),
    ({"name": "TextEncoder", "max_replica": 2}, r"unknown options \['max_replica'\]"),
    ({"name": "TextEncoder", "autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
    ({"name": "TextEncoder", "user_config": {"max_batch": 3}}, "Extra inputs are not permitted"),
    ({"name": "Fusion", "user_config": {"name": "weighted-v0", "option": {}}}, "Extra inputs are not permitted"),
    ({"name": "Retrieval", "user_config": {"ranking": {"ranker": "r.json"}}}, "Extra inputs are not permitted"),
    ({"name": "Retrieval", "user_config": {"ranking": {"candidates_n": 0}}}, "greater than or equal to 1"),
])
def test_bad_deployment_override_is_rejected(override, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_deployment_overrides(AppConfig(), [override])


def test_milvus_server_uri_allows_retrieval_replicas():
    cfg = AppConfig.model_validate({"store": {"uri": "http://milvus:19530"}})
    check_deployment_overrides(cfg, [{"name": "Retrieval", "num_replicas": 3}])
    assert not cfg.store.is_lite


def test_shipped_deployments_override_code_defaults_per_key():
    deployments = load_serve_file(default_config()).deployments
    text = deployment_options("TextEncoder", deployments)
    assert text["user_config"] == {"max_batch_size": 64, "batch_wait_timeout_s": 0.005}
    assert text["autoscaling_config"]["target_ongoing_requests"] == 4
    assert deployment_options("Fusion", deployments)["user_config"]["name"] == "weighted-v0"
    # An override replaces only the keys it names: the rest keep the code defaults.
    gateway = deployment_options("Gateway", [{"name": "Gateway", "max_ongoing_requests": 7}])
    assert gateway["max_ongoing_requests"] == 7 and gateway["ray_actor_options"] == {"num_cpus": 0.1}


def test_render_config_changes_one_deployment_and_keeps_the_rest():
    base = load_serve_file(default_config()).deployments
    config = render_config(default_config(), {"deployments": {"TextEncoder": {"autoscaling_config": {
        "min_replicas": 1, "max_replicas": 3}}}, "fusion": {"name": "weighted-v0", "options": {"block_dim": 64}}})
    after = {d["name"]: d for d in config["applications"][0]["deployments"]}
    before = {d["name"]: d for d in base}
    assert after["TextEncoder"]["autoscaling_config"]["max_replicas"] == 3
    assert after["Fusion"]["user_config"] == {"name": "weighted-v0", "options": {"block_dim": 64}}
    assert after["Fusion"]["ray_actor_options"] == before["Fusion"]["ray_actor_options"]
    assert {n: after[n] for n in ("Gateway", "ImageEncoder", "AudioEncoder", "Retrieval")} == \
        {n: before[n] for n in ("Gateway", "ImageEncoder", "AudioEncoder", "Retrieval")}


def test_unknown_encoder_fails_loudly():
    with pytest.raises(ValueError, match="known encoders"):
        encoder_class("clip-vit")


def test_ranking_override_is_the_retrieval_user_config_only():
    """The ranking stage changes in the Retrieval deployment's user_config, never in the app's args (Serve
    hashes args into every deployment's version: a change there would restart them all)."""
    plain = render_config(default_config(), {})
    ranked = render_config(default_config(), {"ranking": {"ranker_path": "/models/ranker.json", "candidates_n": 150}})
    assert ranked["applications"][0]["args"] == plain["applications"][0]["args"]
    deployments = ranked["applications"][0]["deployments"]
    assert deployment_options("Retrieval", deployments)["user_config"] == {
        "ranking": {"ranker_path": "/models/ranker.json", "candidates_n": 150}}
    assert deployment_options("Retrieval", plain["applications"][0]["deployments"])["user_config"] == {
        "ranking": {"ranker_path": "", "candidates_n": 100, "mmr_lambda": None}}  # the code default: off
