"""Starts the real Serve app (real encoders, Milvus Lite) once for the integration tests."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from grpc_health.v1 import health_pb2

from fusionrec.core.paths import shared_dir
from fusionrec.cli.catalog import catalog_batches, interaction_to_pb, read_jsonl
from fusionrec.cli.client import Client
from fusionrec.core.paths import default_config
from fusionrec.gateway.runtime import start, stop
from fusionrec.cli.sample_catalog import generate_catalog
from fusionrec.v1 import recommender_pb2 as pb

MEDIA = shared_dir() / "media"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HealthTrace(threading.Thread):
    """Polls health from before the app starts until SERVING, recording every status seen."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(target)
        self.seen: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                reply = self.client.health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except Exception:
                status = "UNREACHABLE"
            if not self.seen or self.seen[-1] != status:
                self.seen.append(status)
            if status == "SERVING":
                return
            time.sleep(0.2)


@pytest.fixture(scope="session")
def catalog(tmp_path_factory):
    return generate_catalog(tmp_path_factory.mktemp("catalog"), MEDIA, n_items=32, n_users=6, seed=11)


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    port = _free_port()
    trace = HealthTrace(f"127.0.0.1:{port}")
    trace.start()
    db = tmp_path_factory.mktemp("milvus") / "items.db"
    content = tmp_path_factory.mktemp("content")  # kept raw content (content retention)
    # metrics_port 0: a free port (service.info["metrics_port"]), never the fixed default 9464
    overrides = {"server": {"port": port, "metrics_port": 0}, "store": {"uri": str(db), "content_uri": str(content)}}
    running = start(default_config(), overrides=overrides, num_cpus=2)
    running.overrides = overrides
    trace.join(timeout=60)
    running.health_trace = trace.seen
    running.db_path = db
    running.content_dir = content
    try:
        yield running
    finally:
        stop()


@pytest.fixture(scope="session")
def client(service):
    c = Client(service.target)
    yield c
    c.close()


@pytest.fixture(scope="session")
def loaded(client, catalog):
    """The sample catalog upserted and its interactions recorded, over gRPC."""
    rows = {r["id"]: r for r in read_jsonl(catalog.catalog_path)}
    for batch in catalog_batches(catalog.catalog_path, 16):
        client.stub.UpsertItems(pb.UpsertItemsRequest(items=batch), timeout=300)
    events = [interaction_to_pb(r) for r in read_jsonl(catalog.interactions_path)]
    client.stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=events), timeout=60)
    return {"items": rows, "events": list(read_jsonl(catalog.interactions_path)), "dir": catalog.catalog_path.parent}
