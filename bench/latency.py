"""Benchmarks against a running service: sequential Recommend latency per request kind, system memory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import psutil

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.cli.client import Client

RAY_PROCESS_MARKERS = ("raylet", "gcs_server", "ray::", "default_worker.py", "log_monitor.py",
                       "monitor.py", "dashboard", "runtime_env", "fusionrec")


@dataclass
class LatencyStats:
    kind: str
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    samples_ms: list[float]


def request_kinds(demo_dir: Path, user_id: str) -> dict[str, pb.RecommendRequest]:
    """One Recommend request per kind, built from the sample catalog's media."""
    image = (demo_dir / "media" / "item-0001.jpg").read_bytes()
    audio = (demo_dir / "media" / "item-0001.wav").read_bytes()
    return {
        "by_user": pb.RecommendRequest(user_id=user_id, k=10),
        "text_query": pb.RecommendRequest(user_id=user_id, k=10, query=pb.Content(text="an upbeat photo of a rocket launch")),
        "image_query": pb.RecommendRequest(user_id=user_id, k=10, query=pb.Content(image=image)),
        "audio_query": pb.RecommendRequest(user_id=user_id, k=10, query=pb.Content(audio=audio)),
    }


def sequential_latency(client: Client, requests: dict[str, pb.RecommendRequest], n: int, warmup: int = 5,
                       progress: Callable[[int], None] | None = None) -> list[LatencyStats]:
    out = []
    for kind, request in requests.items():
        for _ in range(warmup):
            client.stub.Recommend(request, timeout=30, metadata=client.metadata)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.stub.Recommend(request, timeout=30, metadata=client.metadata)
            samples.append((time.perf_counter() - t0) * 1000)
            if progress:
                progress(1)
        arr = np.array(samples)
        out.append(LatencyStats(kind, n, float(np.percentile(arr, 50)), float(np.percentile(arr, 99)),
                                float(arr.mean()), samples))
    return out


def system_memory_mb() -> dict[str, float]:
    """Resident memory of the Ray cluster and fusionrec processes on this machine.

    rss double-counts pages shared between processes; pss splits them fairly and is the total to quote.
    """
    rss = pss = 0
    count = 0
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
            if any(m in cmd for m in RAY_PROCESS_MARKERS) and "fusionrec bench" not in cmd:
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"processes": count, "rss_mb": rss / 2**20, "pss_mb": pss / 2**20}


def plot_latency(stats: list[LatencyStats], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for s in stats:
        ax.hist(s.samples_ms, bins=40, alpha=0.55, label=f"{s.kind} (p50 {s.p50_ms:.1f}, p99 {s.p99_ms:.1f} ms)")
    ax.set_xlabel("Recommend latency, ms (sequential calls)")
    ax.set_ylabel("calls")
    ax.set_title("fusionrec Recommend latency by request kind")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(stats: list[LatencyStats], memory: dict[str, float], out_dir: Path, extra: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d"), **extra, "memory": memory,
               "latency": {s.kind: {"n": s.n, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "mean_ms": s.mean_ms}
                           for s in stats}}
    path = out_dir / "latency.json"
    path.write_text(json.dumps(payload, indent=2))
    plot_latency(stats, out_dir / "latency.png")
    return path
