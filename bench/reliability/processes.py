"""Serve replicas as operating-system processes: find them under a process tree, kill -9 them, read RSS.

Ray names each replica's worker process after its actor class, ``ray::ServeReplica:<app>:<deployment>``
(then ``.method`` while one runs), so no Ray connection is needed to find, kill or measure a replica.
"""

from __future__ import annotations

import os
import re
import signal
import time

import psutil

DEPLOYMENTS = ("Gateway", "TextEncoder", "ImageEncoder", "AudioEncoder", "Fusion", "Retrieval")


def tree(root_pid: int) -> list[psutil.Process]:
    """``root_pid`` and every live descendant."""
    try:
        root = psutil.Process(root_pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def replicas(root_pid: int, app_name: str = "fusionrec") -> dict[str, list[psutil.Process]]:
    """Deployment name -> its replica processes under ``root_pid`` (oldest first)."""
    title = re.compile(rf"ServeReplica:{re.escape(app_name)}:(\w+)")
    out: dict[str, list[psutil.Process]] = {}
    for proc in tree(root_pid):
        try:
            found = title.search(" ".join(proc.cmdline()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if found:
            out.setdefault(found.group(1), []).append(proc)
    for procs in out.values():
        procs.sort(key=lambda p: p.create_time())
    return out


def kill9(proc: psutil.Process) -> None:
    """SIGKILL: no handler runs, nothing is drained or flushed."""
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_tree(root_pid: int) -> int:
    """SIGKILL the whole tree at once (a machine lost); returns how many processes were signalled."""
    procs = tree(root_pid)
    for proc in procs:
        kill9(proc)
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


def wait_replaced(root_pid: int, deployment: str, killed_pid: int, count_before: int, timeout_s: float,
                  app_name: str = "fusionrec") -> bool:
    """Until the deployment has ``count_before`` replica processes again, none of them ``killed_pid``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [p.pid for p in replicas(root_pid, app_name).get(deployment, [])]
        if killed_pid not in pids and len(pids) >= count_before:
            return True
        time.sleep(0.2)
    return False


def rss_by_replica(root_pid: int, app_name: str = "fusionrec") -> dict[str, int]:
    """``<deployment>#<pid>`` -> resident set size in bytes, for every replica under ``root_pid``."""
    out = {}
    for deployment, procs in replicas(root_pid, app_name).items():
        for proc in procs:
            try:
                out[f"{deployment}#{proc.pid}"] = proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
    return out
