"""The service under test as its own process tree (`fusionrec serve` on a rendered config), so the
whole tree can be killed -9 and started again on the same store and port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.bench.reliability import processes
from fusionrec.gateway.runtime import _merge as merge_dicts, render_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(target: str, timeout_s: float) -> bool:
    """Poll grpc.health.v1 until SERVING (True) or the timeout (False)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    return False


class ServiceProcess:
    """`fusionrec serve` in a subprocess over a store under ``work``; ``token`` required by the front door."""

    def __init__(self, config: Path, work: Path, token: str = "", overrides: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.work = work
        self.env = env or {}
        self.port = free_port()
        self.token = token
        base = {"server": {"port": self.port, "metrics_port": 0, "auth_token": token},
                "store": {"uri": str(work / "milvus.db"), "content_uri": str(work / "content")}}
        rendered = render_config(config, merge_dicts(base, overrides or {}))
        self.config_path = work / "serve.yaml"
        work.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(rendered))
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout_s: float = 900) -> float:
        """Start the tree and wait until health is SERVING; returns the seconds it took."""
        t0 = time.monotonic()
        env = os.environ | {"FUSIONREC_HOME": str(self.work / "home")} | self.env
        log = open(self.work / f"serve-{int(time.time())}.log", "w")
        fusionrec = Path(sys.executable).with_name("fusionrec")
        self.proc = subprocess.Popen([str(fusionrec), "serve", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        while not wait_serving(self.target, 5):
            if self.proc.poll() is not None:
                raise RuntimeError(f"fusionrec serve exited ({self.proc.returncode}); see {self.work}/serve-*.log")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"service not SERVING after {timeout_s:.0f} s")
        return time.monotonic() - t0

    def kill_tree(self) -> int:
        return processes.kill_tree(self.pid)

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM (fusionrec serve stops Serve and Ray), then SIGKILL whatever of the tree is left."""
        if self.proc is None:
            return
        left = processes.tree(self.pid)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        for proc in left:
            processes.kill9(proc)
        self.proc = None

