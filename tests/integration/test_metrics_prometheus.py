"""A real Prometheus (Debian's `prometheus` package) scrapes the running service's /metrics endpoint, with
a config derived from the shipped deploy/prometheus.yml; values are read back through its query API, and
every expression of the shipped Grafana dashboard is evaluated by it."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import fusionrec.deploy
from fusionrec.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration

DEPLOY = Path(fusionrec.deploy.__file__).parent
SCRAPE_INTERVAL = "1s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read()


def _scrape(metrics_ports: list[int]) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value summed over the Gateway replicas' endpoints (each its own)."""
    out: dict[tuple[str, tuple], float] = {}
    for port in metrics_ports:
        text = _get(f"http://127.0.0.1:{port}/metrics").decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0.0) + s.value
    return out


def _metrics_ports(service) -> list[int]:
    """Every Gateway replica's metrics port (the replicas share the gRPC port, each has its own metrics)."""
    return [g["metrics_port"] for g in service.info.get("gateways", [service.info]) if g.get("metrics_port")]


class Prometheus:
    """The real prometheus binary on a free loopback port, its own storage, scraping the given targets."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("the `prometheus` binary is not installed: `apt-get install -y prometheus` "
                        "(Debian's package, 2.42; .ci/run installs it)")
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = SCRAPE_INTERVAL
        config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
        job = config["scrape_configs"][0]
        assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464", "127.0.0.1:9465"]  # the shipped default
        job["static_configs"][0]["targets"] = targets
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = _free_port()
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {self.log.name}"
            try:
                _get(f"{self.url}/-/ready")
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"prometheus not ready in {timeout_s} s; see {self.log.name}")

    def query(self, expr: str) -> dict:
        reply = json.loads(_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant vector query, None when empty."""
        result = self.query(expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()  # by its pid, the process this test started
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(service, tmp_path):
    ports = _metrics_ports(service)
    assert ports, f"the Gateway did not report a bound metrics port: {service.info}"
    prom = Prometheus(tmp_path, [f"127.0.0.1:{port}" for port in ports])
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def _eventually(prom: Prometheus, expr: str, at_least: float, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    got = None
    while time.monotonic() < deadline:
        got = prom.value(expr)
        if got is not None and got >= at_least:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{expr} = {got}, expected >= {at_least} within {timeout_s} s")


def _count(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_prometheus_scrapes_rpc_stage_and_store_metrics(service, client, loaded, prometheus):
    before = _scrape(_metrics_ports(service))
    ok_before = _count(before, "fusionrec_rpc_requests_total", method="Recommend", code="OK")
    invalid_before = _count(before, "fusionrec_rpc_requests_total", method="Recommend", code="INVALID_ARGUMENT")
    user = loaded["events"][0]["user_id"]
    for text in ("a calm photo of a cat", "a rocket at night", "a cup of coffee"):
        assert client.stub.Recommend(pb.RecommendRequest(user_id=user, k=5, query=pb.Content(text=text))).items
    item = pb.ItemInput(item_id="metrics-test-1", content=pb.Content(text="a horse running on a beach"))
    assert client.stub.UpsertItems(pb.UpsertItemsRequest(items=[item])).upserted == 1
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Recommend(pb.RecommendRequest(user_id=user, k=100_000))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        _eventually(prometheus, 'up{job="fusionrec"}', 1)
        _eventually(prometheus, 'sum(fusionrec_rpc_requests_total{method="Recommend",code="OK"})', ok_before + 3)
        _eventually(prometheus, 'sum(fusionrec_rpc_requests_total{method="Recommend",code="INVALID_ARGUMENT"})',
                    invalid_before + 1)
        _eventually(prometheus, 'sum(fusionrec_rpc_requests_total{method="UpsertItems",code="OK"})', 1)
        _eventually(prometheus, 'sum(fusionrec_rpc_duration_seconds_count{method="Recommend"})', ok_before + 4)
        for method, stage in (("Recommend", "encode_text"), ("Recommend", "retrieve_and_rank"),
                              ("UpsertItems", "encode"), ("UpsertItems", "fuse"), ("UpsertItems", "store")):
            _eventually(prometheus, f'sum(fusionrec_stage_duration_seconds_count{{method="{method}",stage="{stage}"}})',
                        1)
        _eventually(prometheus, "fusionrec_store_items", len(loaded["items"]) + 1)
        _eventually(prometheus, "fusionrec_index_memory_bytes", 1)
        _eventually(prometheus, 'sum(fusionrec_encoder_batch_size_count{modality="text"})', 4)
        _eventually(prometheus, 'sum(fusionrec_encoder_replicas{modality="image"})', 1)
        assert prometheus.value("fusionrec_index_stale_seconds") is not None
        names = {r["metric"]["__name__"] for r in prometheus.query('{job="fusionrec"}')["result"]}
        ours = {n for n in names if not n.startswith(("up", "scrape_"))}
        assert ours and all(n.startswith("fusionrec_") for n in ours), sorted(ours)
    finally:
        client.stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["metrics-test-1"]))


def test_every_dashboard_expression_evaluates(prometheus):
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 9
    used = set()
    for expr in exprs:
        prometheus.query(expr.replace("$__rate_interval", "1m"))  # Grafana's variable; a bad expression fails here
        used |= set(re.findall(r"fusionrec_[a-z_]+", expr))
    for family in ("fusionrec_rpc_requests_total", "fusionrec_rpc_duration_seconds_bucket",
                   "fusionrec_stage_duration_seconds_bucket", "fusionrec_encoder_batch_size_bucket",
                   "fusionrec_store_items", "fusionrec_rejected_requests_total"):
        assert family in used, family
