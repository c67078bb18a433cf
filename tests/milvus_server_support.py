"""A real Milvus standalone server for tests: the `milvus` package's `milvus-server` (Milvus 2.3.5).

Every port it binds is a free one picked here (the `--*-port` options; the embedded etcd's client and
peer ports through an `ETCD_CONFIG_PATH` file, since it otherwise binds 2379/2380 whatever
`--etcd-port` says; the metrics port the wrapper finds itself from 9091 up). It talks to the tests on
127.0.0.1 only. Stopped by its pid: SIGINT to the `milvus-server` wrapper (which terminates the
binary), then SIGKILL to its process group for anything left.

`proxy.timeTickInterval` is lowered from 200 to ``TICK_MS``: a Strong-consistency read waits for the
next time tick (p50 200 ms per search at 200, measured here), see the README.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TICK_MS = 20
PORT_OPTIONS = ("etcd-port", "root-coord-port", "proxy-port", "proxy-internal-port", "query-coord-port",
                "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port")
START_TIMEOUT_S = 180


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def server_command() -> str:
    """The `milvus-server` script beside this interpreter; skips the test when the package is absent."""
    pytest.importorskip("milvus", reason="the `milvus` package (test extra) ships milvus-server")
    path = Path(sys.executable).with_name("milvus-server")
    if not path.exists():
        found = shutil.which("milvus-server")
        if found is None:
            pytest.skip("milvus-server is not installed")
        path = Path(found)
    return str(path)


class MilvusServer:
    """One `milvus-server` process over ``data_dir``; ``uri`` once started."""

    def __init__(self, data_dir: Path, tick_ms: int = TICK_MS) -> None:
        self.data_dir = Path(data_dir)
        self.tick_ms = tick_ms
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MilvusServer":
        *picked, peer = _free_ports(len(PORT_OPTIONS) + 1)
        ports = dict(zip(PORT_OPTIONS, picked))
        self.port = ports["proxy-port"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        etcd_cfg = self.data_dir / "embed-etcd.yaml"
        client_url, peer_url = f"http://127.0.0.1:{ports['etcd-port']}", f"http://127.0.0.1:{peer}"
        etcd_cfg.write_text(
            f"listen-client-urls: {client_url}\nadvertise-client-urls: {client_url}\n"
            f"listen-peer-urls: {peer_url}\ninitial-advertise-peer-urls: {peer_url}\n"
            f"initial-cluster: default={peer_url}\n")
        cmd = [server_command(), "--data", str(self.data_dir), "--extra-config",
               f"proxy.timeTickInterval={self.tick_ms}"]
        for option, port in ports.items():
            cmd += [f"--{option}", str(port)]
        env = dict(os.environ, ETCD_CONFIG_PATH=str(etcd_cfg), ETCD_USE_EMBED="true")
        log = open(self.data_dir / "server.out", "w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-server exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                client = MilvusClient(uri=self.uri, timeout=2)
                client.list_collections()
                client.close()
                return
            except Exception:
                time.sleep(0.5)
        raise TimeoutError(f"milvus-server not ready after {START_TIMEOUT_S} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for name in ("server.out", "logs/milvus-stderr.log"):
            path = self.data_dir / name
            if path.exists():
                out.append(f"--- {name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """SIGINT to the wrapper (it stops the binary), then SIGKILL to whatever is left of its group; the
        binaries and data go, the logs stay."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.kill(proc.pid, signal.SIGINT)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        for name in ("bin", "data"):  # unpacked binaries (~250 MB) and data (~270 MB even when tiny: preallocated
            shutil.rmtree(self.data_dir / name, ignore_errors=True)  # WALs); the logs stay for a failed test

    def __enter__(self) -> "MilvusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

