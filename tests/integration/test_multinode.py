"""A two-node Ray cluster on this machine, loopback only: `fusionrec serve --ray-address` deploys the app
with every encoder replica on the second node (a custom resource only that node has); Recommend is
served, keeps answering when the second node dies (query modalities dropped, health NOT_SERVING) and
recovers when the node comes back.

The pytest process never joins this cluster (the session `service` fixture may have its own Ray up in
it): the nodes, the CLI and the probes that read the cluster's state are subprocesses, stopped by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from fusionrec.cli.catalog import catalog_batches
from fusionrec.cli.client import Client
from fusionrec.cli.sample_catalog import generate_catalog
from fusionrec.core.paths import default_config, shared_dir
from fusionrec.gateway.runtime import LOOPBACK_ENV, RUNTIME_ENV_DEFAULTS, render_config
from fusionrec.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ENCODERS = ("TextEncoder", "ImageEncoder", "AudioEncoder")
HEAD_ONLY = ("Gateway", "Fusion", "Retrieval")
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
#: Run in a subprocess: the cluster's nodes and, per live Serve replica, the node it runs on (state API).
PROBE = """
import json, sys
import ray
from ray.util.state import list_actors
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR", namespace="probe")
nodes = [{"id": n["NodeID"], "alive": n["Alive"], "worker_node": "worker_node" in n["Resources"]} for n in ray.nodes()]
replicas = {}
for actor in list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=10000, detail=True):
    if (actor.name or "").startswith("SERVE_REPLICA::"):
        replicas.setdefault(actor.name.split("#")[1], []).append(actor.node_id)
print("PROBE " + json.dumps({"nodes": nodes, "replicas": replicas}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Node 2 starts the way Ray's own `ray.cluster_utils.Cluster.add_node` starts a node (a non-head `Node`), in
#: a process of its own. `ray start --address` refuses a second node while Ray's single-machine switch is on,
#: and with the switch off every Ray server binds all interfaces (measured here: GCS, raylet and agents on
#: `::` or 0.0.0.0, whatever --node-ip-address says): a loopback-only cluster needs the switch on.
WORKER_NODE = """
import json, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams
node = Node(RayParams(**json.loads(sys.argv[1])), head=False, shutdown_at_exit=True, spawn_reaper=True)
print("node", node.node_id, flush=True)
while True:
    time.sleep(1)
"""
#: Per test run: every process of this cluster authenticates with it (Ray's token auth), none reads ~/.ray.
TOKEN = secrets.token_hex(32)


def _env(node: bool = False) -> dict[str, str]:
    """Loopback-only Ray (gateway/runtime.py's switch), this cluster's token, no inherited address. A node also
    gets the Ray Serve switches its replicas need (RAY_SERVE_*: set where Ray starts, README); a driver must not
    (with them `fusionrec serve` routes its handles on a loop it closes, and fails on exit)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")
           and not k.startswith("RAY_SERVE_")}
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    return env | (RUNTIME_ENV_DEFAULTS if node else {}) | LOOPBACK_ENV | auth


class Started:
    """A subprocess in its own session, stopped with every process under it (snapshotted, by pid)."""

    def __init__(self, args: list[str], log_path: Path, node: bool = False) -> None:
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=_env(node),
                                     start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}

    def tree(self) -> list[psutil.Process]:
        """The process and everything under it now, remembered for `stop`."""
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        return [p for p in self.seen.values() if p.is_running()]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> None:
        """`sig` to the process; after timeout_s, SIGKILL to whatever of its tree is left."""
        self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill_tree()
        self.log.close()

    def kill_tree(self) -> None:
        """SIGKILL to the whole tree at once: a machine lost, nothing drained."""
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(list(self.seen.values()), timeout=30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


class Cluster:
    """A head (`ray start --head --block`: GCS, dashboard) and worker nodes, every port chosen here so that
    another Ray on this machine cannot collide with Ray's fixed defaults."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.nodes = root, _free_port(), []

    def start_head(self) -> Started:
        args = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(self.port), "--node-ip-address",
                "127.0.0.1", "--num-cpus", "2", "--resources", json.dumps({"head_node": 10}),
                "--object-store-memory", str(300 << 20), "--disable-usage-stats",
                "--temp-dir", str(self.root / "ray"),  # short: Ray's socket paths must stay under 107 bytes
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(_free_port())]
        for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
            args += [flag, str(_free_port())]
        return self._started(args)

    def start_worker(self) -> Started:
        params = {"gcs_address": f"127.0.0.1:{self.port}", "node_ip_address": "127.0.0.1", "num_cpus": 2,
                  "resources": {"worker_node": 10}, "object_store_memory": 300 << 20, "include_log_monitor": False,
                  **{key: _free_port() for key in ("node_manager_port", "object_manager_port",
                                                   "dashboard_agent_listen_port", "metrics_agent_port",
                                                   "runtime_env_agent_port", "metrics_export_port")}}
        return self._started([sys.executable, "-c", WORKER_NODE, json.dumps(params)])

    def _started(self, args: list[str]) -> Started:
        node = Started(args, self.root / f"node{len(self.nodes)}.log", node=True)
        self.nodes.append(node)
        return node

    def probe(self) -> dict:
        out = subprocess.run([sys.executable, "-c", PROBE, f"127.0.0.1:{self.port}"], env=_env(),
                             capture_output=True, text=True, timeout=120)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")]
        assert line, f"probe failed: {out.stderr[-2000:]}"
        return json.loads(line[-1][len("PROBE "):])

    def wait_for_nodes(self, alive: int, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.probe()
            if sum(n["alive"] for n in state["nodes"]) == alive or time.monotonic() > deadline:
                return state
            time.sleep(2)


def _wait_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def _until(check, timeout_s: float, period_s: float = 1.0):
    """check() until it returns something truthy (returned) or timeout_s passes (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except grpc.RpcError:
            value = None
        if value:
            return value
        time.sleep(period_s)
    return None


def _config(work: Path, port: int) -> Path:
    """deploy/local.yaml on a fresh store: encoders need the resource only worker nodes have, the rest the
    head's (Serve spreads replicas over nodes otherwise)."""
    placed = {name: {"ray_actor_options": {"num_cpus": 0.25, "resources": {"worker_node": 1}}} for name in ENCODERS}
    placed |= {name: {"ray_actor_options": {"num_cpus": 0.1, "resources": {"head_node": 1}}} for name in HEAD_ONLY}
    # ranking_reserve_ms: time kept for retrieval once an encoder that is gone has used up its share of the
    # deadline (the 50 ms default is too tight for two busy cores: DEADLINE_EXCEEDED instead of degraded).
    overrides = {"server": {"port": port, "metrics_port": 0, "ranking_reserve_ms": 1000},
                 "store": {"uri": str(work / "items.db"), "content_uri": str(work / "content")},
                 "deployments": placed}
    path = work / "multinode.yaml"
    path.write_text(yaml.safe_dump(render_config(default_config(), overrides)))
    return path


def _load(client: Client, work: Path) -> None:
    catalog = generate_catalog(work / "catalog", shared_dir() / "media", n_items=8, n_users=1, seed=3)
    for batch in catalog_batches(catalog.catalog_path, 8):
        client.stub.UpsertItems(pb.UpsertItemsRequest(items=batch), timeout=300)
    events = [pb.Interaction(user_id="mn-user", item_id=f"item-{k:04d}", kind="view", timestamp_s=1_704_067_200.0 + k)
              for k in range(1, 5)]
    client.stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=events), timeout=60)


def _text_query(client: Client) -> pb.RecommendResponse:
    request = pb.RecommendRequest(user_id="mn-user", k=3, query=pb.Content(text="a calm photo of a cat"))
    return client.stub.Recommend(request, timeout=15)


def _gateway_log(root: Path) -> str:
    """The end of the Gateway replica's log (why an answer failed)."""
    logs = sorted((root / "ray").glob("session_*/logs/serve/replica_*Gateway*.log"))
    return logs[-1].read_text()[-3000:] if logs else "(no Gateway log)"


def _listening_beyond_loopback(started: list[Started]) -> list[tuple[str, str]]:
    """(process, address) listening off loopback, except the Serve replicas' own [::] ports (README)."""
    out = []
    for node in started:
        for p in node.tree():
            try:
                for c in p.net_connections("inet"):
                    if c.status == psutil.CONN_LISTEN and c.laddr.ip not in LOOPBACK:
                        out.append((p.name(), f"{c.laddr.ip}:{c.laddr.port}"))
            except psutil.NoSuchProcess:
                continue
    return [(name, addr) for name, addr in out if not (name.startswith("ray::ServeReplica") and addr.startswith(":::"))]


def _check_placement(state: dict, worker_id: str) -> None:
    """Every encoder replica on the worker node, the rest on the head, as their resources say."""
    head_id = next(n["id"] for n in state["nodes"] if n["alive"] and not n["worker_node"])
    for name in ENCODERS:
        assert state["replicas"].get(name) and set(state["replicas"][name]) == {worker_id}, state
    for name in HEAD_ONLY:
        assert set(state["replicas"].get(name, ())) == {head_id}, state


def _check_degraded(cluster: Cluster, client: Client, root: Path) -> None:
    """Without the worker node: health NOT_SERVING, text queries answered without text, by-user ones as before."""
    state = cluster.wait_for_nodes(alive=1)
    assert sum(n["alive"] for n in state["nodes"]) == 1, state
    assert not any(state["replicas"].get(name) for name in ENCODERS), state["replicas"]
    assert all(state["replicas"].get(name) for name in HEAD_ONLY), state["replicas"]
    assert _until(lambda: not client.serving(), 90), "health stayed SERVING without any encoder replica"
    try:
        reply = _text_query(client)
    except grpc.RpcError as err:
        raise AssertionError(f"Recommend failed without node 2: {err.code()}\n{_gateway_log(root)}") from err
    assert reply.items and reply.degraded and [d.modality for d in reply.modalities_dropped] == ["text"], reply
    by_user = client.stub.Recommend(pb.RecommendRequest(user_id="mn-user", k=3), timeout=10)
    assert len(by_user.items) == 3 and not by_user.degraded


def test_two_nodes_serve_survive_losing_one_and_recover():
    root = Path(tempfile.mkdtemp(prefix="frmn-", dir="/tmp"))  # short on purpose (socket paths)
    cluster = Cluster(root)
    serve = None
    try:
        cluster.start_head()
        _wait_port(cluster.port)
        cluster.start_worker()
        state = cluster.wait_for_nodes(alive=2, timeout_s=300)  # a loaded 2-core machine is slow, never wrong
        worker_ids = [n["id"] for n in state["nodes"] if n["alive"] and n["worker_node"]]
        assert len(worker_ids) == 1, state

        gw_port = _free_port()
        serve = Started([str(BIN / "fusionrec"), "serve", "--config", str(_config(root, gw_port)),
                         "--ray-address", f"127.0.0.1:{cluster.port}"], root / "serve.log")
        client = Client(f"127.0.0.1:{gw_port}")
        assert _until(client.serving, 400, 2), f"never SERVING: {(root / 'serve.log').read_text()[-3000:]}"
        _load(client, root)
        reply = _text_query(client)
        assert len(reply.items) == 3 and not reply.degraded and "text" in reply.modalities_used
        _check_placement(cluster.probe(), worker_ids[0])
        assert _listening_beyond_loopback([*cluster.nodes, serve]) == []

        # Node 2 lost at once (every process of it killed): the encoders are gone, nothing else is.
        t_lost = time.monotonic()
        cluster.nodes[1].kill_tree()
        _check_degraded(cluster, client, root)
        t_degraded = time.monotonic()

        # Node 2 back (a new node, same resource): Serve places the encoders there again.
        cluster.start_worker()
        assert _until(client.serving, 300, 2), "health never SERVING again after node 2 came back"
        assert _until(lambda: not _text_query(client).degraded, 120), "text queries stayed degraded"
        print(f"node 2 lost: degraded answers checked {t_degraded - t_lost:.1f} s later; back: SERVING and "
              f"text queries whole {time.monotonic() - t_degraded:.1f} s after it restarted")
        state = cluster.probe()
        back = [n["id"] for n in state["nodes"] if n["alive"] and n["worker_node"]]
        assert len(back) == 1 and back != worker_ids, state
        _check_placement(state, back[0])

        serve.stop(signal.SIGTERM, timeout_s=120)  # the CLI deletes the app and leaves the cluster
        assert serve.proc.returncode == 0, (root / "serve.log").read_text()[-3000:]
    finally:
        for started in [serve, *reversed(cluster.nodes)]:
            if started is not None:
                started.stop(signal.SIGTERM, timeout_s=60)
        if not os.environ.get("FUSIONREC_KEEP_TMP"):  # set it to keep the nodes' logs after a failure
            shutil.rmtree(root, ignore_errors=True)
