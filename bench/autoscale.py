"""`fusionrec bench autoscale`: ramp Recommend load (text, image and audio queries) up and down and record,
per deployment, its replicas over time with throughput and p99 per phase: bench/results/autoscale.{json,png}."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc

Log = Callable[[str], None]
QUERY_FIELDS = {"text": "text", "image": "image", "audio": "audio"}


class AutoscalePlan(BaseModel):
    """The load's shape: idle -> ramp -> hold -> down -> idle until every autoscaled deployment is back at its floor."""

    model_config = ConfigDict(extra="forbid")
    callers_per_modality: int = Field(8, ge=1, description="Closed-loop callers per query modality at the peak.")
    modalities: tuple[str, ...] = Field(("text", "image", "audio"),
                                        description="Query modalities, one caller group each.")
    idle_s: float = Field(10.0, ge=0, description="No load before the ramp: the replica floor.")
    ramp_s: float = Field(20.0, ge=0, description="Callers rise linearly from 1 to the peak.")
    hold_s: float = Field(90.0, ge=0, description="All callers at the peak (long enough for new replicas to start "
                                                  "and serve: 15-35 s to start here).")
    down_s: float = Field(10.0, ge=0, description="Callers fall linearly to 0.")
    settle_max_s: float = Field(150.0, gt=0, description="At most this long idle after the load (and before it), "
                                                         "waiting for every autoscaled deployment's minimum.")
    tail_s: float = Field(3.0, ge=0, description="Idle kept after the floor is reached, for the record.")
    audio_clip_s: float = Field(30.0, gt=0, le=30, description="Audio queries are the sample clips looped to this "
                                "length (a 30 s preview is the usual music query; the 2 s samples cost ~2 ms).")
    poll_interval_s: float = Field(0.5, gt=0, description="serve.status() period.")
    call_timeout_s: float = Field(10.0, gt=0, description="Per Recommend call.")

    def callers(self, phase: str, frac: float) -> int:
        """Callers per modality `frac` (0..1) into `phase`."""
        n = self.callers_per_modality
        if phase == "ramp":
            return max(1, math.ceil(frac * n))
        if phase == "hold":
            return n
        if phase == "down":
            return round((1 - frac) * n)
        return 0


@dataclass
class Sample:
    t_s: float  # call start, since the run's t0
    ms: float
    kind: str
    code: str  # "OK" or the gRPC status name


class ReplicaPoller(threading.Thread):
    """Every poll_interval_s: per deployment of the app, its live replicas and those still starting."""

    def __init__(self, app_name: str, interval_s: float, t0: float) -> None:
        super().__init__(daemon=True)
        self.app_name, self.interval_s, self.t0 = app_name, interval_s, t0
        self.samples: dict[str, list[tuple[float, int, int]]] = {}  # name -> (t_s, live, starting)
        self.stop = threading.Event()

    def poll(self) -> dict[str, tuple[int, int]]:
        from ray import serve

        from fusionrec.gateway.health import live_replicas

        status = serve.status()
        app = status.applications.get(self.app_name)
        out = {}
        for name, deployment in (app.deployments if app else {}).items():
            starting = sum(n for s, n in deployment.replica_states.items() if str(getattr(s, "value", s)) == "STARTING")
            out[name] = (live_replicas(status, self.app_name, name), starting)
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic() - self.t0
            try:
                for name, (live, starting) in self.poll().items():
                    self.samples.setdefault(name, []).append((t, live, starting))
            except Exception:  # a slow or restarting controller: a gap in the record, not a failed run
                pass
            self.stop.wait(self.interval_s)

    def latest(self) -> dict[str, tuple[int, int]]:
        return {name: rows[-1][1:] for name, rows in self.samples.items() if rows}


def replica_bounds(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Deployment name -> (min, max) replicas in a rendered Serve config (code defaults filled in)."""
    from fusionrec.gateway.app import deployment_options
    from fusionrec.gateway.config import AppConfig, deployment_names

    app = config["applications"][0]
    overrides = app.get("deployments") or []
    out = {}
    for name in deployment_names(AppConfig.model_validate(app.get("args") or {})):
        options = deployment_options(name, overrides)
        scaling = options.get("autoscaling_config")
        out[name] = ((scaling.get("min_replicas", 1), scaling["max_replicas"]) if scaling
                     else (options.get("num_replicas", 1),) * 2)
    return out


def at_floor(state: dict[str, tuple[int, int]], bounds: dict[str, tuple[int, int]]) -> bool:
    """Every autoscaled deployment runs its minimum and starts nothing (state: name -> (live, starting))."""
    return all(state.get(name) == (low, 0) for name, (low, high) in bounds.items() if high > low)


class Schedule:
    """Walks the plan's phases, setting how many callers per modality are active; records each phase's span."""

    def __init__(self, plan: AutoscalePlan, t0: float, settled: Callable[[], bool]) -> None:
        self.plan, self.t0, self.settled = plan, t0, settled
        self.active = 0
        self.done = False
        self.spans: list[tuple[str, float, float]] = []

    async def run(self) -> None:
        plan = self.plan
        phases = (("idle", plan.idle_s), ("ramp", plan.ramp_s), ("hold", plan.hold_s), ("down", plan.down_s))
        for name, length_s in phases:
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < length_s:
                self.active = plan.callers(name, elapsed / length_s)
                await asyncio.sleep(0.1)
            self.spans.append((name, start - self.t0, time.monotonic() - self.t0))
        self.active = 0
        start = time.monotonic()
        while time.monotonic() - start < plan.settle_max_s and not self.settled():
            await asyncio.sleep(plan.poll_interval_s)
        await asyncio.sleep(plan.tail_s)
        self.spans.append(("settle", start - self.t0, time.monotonic() - self.t0))
        self.done = True


async def _drive(target: str, requests: dict[str, list[pb.RecommendRequest]], schedule: Schedule) -> list[Sample]:
    """One caller group per modality; caller i of a group calls while i < schedule.active."""
    samples: list[Sample] = []
    timeout_s = schedule.plan.call_timeout_s
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        await channel.channel_ready()

        async def caller(kind: str, i: int) -> None:
            rng = random.Random(f"{kind}-{i}")
            while not schedule.done:
                if i >= schedule.active:
                    await asyncio.sleep(0.05)
                    continue
                t = time.monotonic()
                try:
                    await stub.Recommend(rng.choice(requests[kind]), timeout=timeout_s)
                    code = "OK"
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                samples.append(Sample(t - schedule.t0, (time.monotonic() - t) * 1000, kind, code))

        n = schedule.plan.callers_per_modality
        await asyncio.gather(schedule.run(), *(caller(kind, i) for kind in requests for i in range(n)))
    return samples


def looped_clip(wav: bytes, seconds: float) -> bytes:
    """The WAV clip repeated to `seconds` long (16-bit PCM)."""
    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    n = int(seconds * rate)
    reps = -(-n // len(samples))
    out = io.BytesIO()
    sf.write(out, np.tile(samples, (reps,) + (1,) * (samples.ndim - 1))[:n], rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def query_requests(inputs: dict[str, list], plan: AutoscalePlan, per_kind: int = 16
                   ) -> dict[str, list[pb.RecommendRequest]]:
    """Kind (`text_query`, ...) -> Recommend requests carrying that modality's content only (work for its encoder)."""
    out = {}
    for m in plan.modalities:
        contents = inputs[m][:per_kind]
        if m == "audio":
            contents = [looped_clip(x, plan.audio_clip_s) for x in contents]
        out[f"{m}_query"] = [pb.RecommendRequest(k=10, query=pb.Content(**{QUERY_FIELDS[m]: x})) for x in contents]
    return out


def _phase_stats(samples: list[Sample], name: str, start_s: float, end_s: float, peak: int) -> dict[str, Any]:
    """Throughput (answered calls started in the phase / its length) and latency of one phase."""
    inside = [s for s in samples if start_s <= s.t_s < end_s]
    ok = [s for s in inside if s.code == "OK"]
    span = max(end_s - start_s, 1e-9)

    def pct(xs: list[float], q: float) -> float | None:
        return round(float(np.percentile(xs, q)), 1) if xs else None

    by_kind = {}
    for kind in sorted({s.kind for s in inside}):
        mine = [s.ms for s in ok if s.kind == kind]
        by_kind[kind] = {"qps": round(len(mine) / span, 2), "p99_ms": pct(mine, 99)}
    return {"name": name, "start_s": round(start_s, 2), "end_s": round(end_s, 2), "callers_per_modality": peak,
            "requests": len(inside), "qps": round(len(ok) / span, 2), "p50_ms": pct([s.ms for s in ok], 50),
            "p99_ms": pct([s.ms for s in ok], 99), "errors": dict(Counter(s.code for s in inside if s.code != "OK")),
            "by_kind": by_kind}


def _deployment_record(rows: list[tuple[float, int, int]], low: int, high: int) -> dict[str, Any]:
    """min / max_seen / final and the timeline of one deployment, with when it first hit its max and came back."""
    live = [r[1] for r in rows] or [0]
    first_up = next((t for t, n, s in rows if n + s > low), None) if high > low else None  # Serve decided
    first_max = next((t for t, n, _ in rows if n >= high), None) if high > low else None
    back = None
    if first_max is not None:
        back = next((t for t, n, s in rows if t > first_max and n == low and s == 0), None)
    first_up, first_max, back = (None if t is None else round(t, 1) for t in (first_up, first_max, back))
    return {"min": low, "max": high, "max_seen": max(live), "final": live[-1], "autoscaled": high > low,
            "first_upscale_s": first_up, "first_at_max_s": first_max, "back_at_min_s": back,
            "timeline": [[round(t, 2), n] for t, n, _ in rows],
            "starting": [[round(t, 2), s] for t, _, s in rows if s]}


def measure(target: str, app_name: str, bounds: dict[str, tuple[int, int]], inputs: dict[str, list],
            plan: AutoscalePlan, log: Log = print) -> dict[str, Any]:
    """Run the plan against a running app and return the result (`deployments`, `phases`, `went_min_max_min`)."""
    requests = query_requests(inputs, plan)
    waited = time.monotonic()
    poller = ReplicaPoller(app_name, plan.poll_interval_s, waited)
    while not at_floor(poller.poll(), bounds) and time.monotonic() - waited < plan.settle_max_s:
        time.sleep(plan.poll_interval_s)  # a previous load may have left replicas up: start from the floor
    log(f"at the replica floor after {time.monotonic() - waited:.1f} s; load: {plan.callers_per_modality} callers "
        f"x {', '.join(plan.modalities)} queries")
    t0 = poller.t0 = time.monotonic()
    poller.start()
    schedule = Schedule(plan, t0, lambda: at_floor(poller.latest(), bounds))
    try:
        samples = asyncio.run(_drive(target, requests, schedule))
    finally:
        poller.stop.set()
        poller.join(timeout=30)
    peaks = {"idle": 0, "ramp": plan.callers_per_modality, "hold": plan.callers_per_modality,
             "down": plan.callers_per_modality, "settle": 0}
    phases = [_phase_stats(samples, name, a, b, peaks[name]) for name, a, b in schedule.spans]
    deployments = {name: _deployment_record(rows, *bounds.get(name, (1, 1))) for name, rows in poller.samples.items()}
    scaled = [d for d in deployments.values() if d["autoscaled"]]
    hold = next((a, b) for name, a, b in schedule.spans if name == "hold")
    all_max = max((d["first_at_max_s"] or math.inf for d in scaled), default=math.inf)
    if hold[0] <= all_max < hold[1]:  # the peak load from when every autoscaled deployment had first reached its max
        phases.append(_phase_stats(samples, "hold after scale-up", all_max, hold[1], plan.callers_per_modality))
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "plan": plan.model_dump(mode="json"),
              "went_min_max_min": bool(scaled) and all(d["max_seen"] == d["max"] and d["final"] == d["min"]
                                                      for d in scaled),
              "deployments": deployments, "phases": phases,
              "throughput_1s": _throughput_series(samples, schedule, plan)}
    for p in phases:
        log(f"  {p['name']:<7} {p['start_s']:6.1f}-{p['end_s']:6.1f} s  {p['qps']:7.1f} req/s  p99 {p['p99_ms']} ms"
            f"  {p['errors'] or ''}")
    for name, d in deployments.items():
        if d["autoscaled"]:
            log(f"  {name:<13} min {d['min']} -> max seen {d['max_seen']} (replica added at {d['first_upscale_s']} s, "
                f"live at {d['first_at_max_s']} s) -> final {d['final']} (back at {d['back_at_min_s']} s)")
    return result


def _throughput_series(samples: list[Sample], schedule: Schedule, plan: AutoscalePlan) -> list[list[float]]:
    """[t_s, answered calls started in that second, callers per modality then] per second of the run."""
    end = schedule.spans[-1][2] if schedule.spans else 0.0
    counts = Counter(int(s.t_s) for s in samples if s.code == "OK")
    out = []
    for sec in range(int(end) + 1):
        phase = next(((n, a, b) for n, a, b in schedule.spans if a <= sec < b), ("settle", 0.0, 1.0))
        frac = (sec - phase[1]) / max(phase[2] - phase[1], 1e-9)
        out.append([sec, counts.get(sec, 0), plan.callers(phase[0], frac)])
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Replicas over time per autoscaled deployment (top), load and throughput (bottom), phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_q) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=(1.2, 1))
    scaled = {n: d for n, d in result["deployments"].items() if d["autoscaled"]}
    for k, (name, d) in enumerate(sorted(scaled.items())):
        t = [p[0] for p in d["timeline"]]
        starting = dict(map(tuple, d["starting"]))
        offset = 0.04 * (k - 1)  # lines that coincide stay visible
        line, = ax_r.step(t, [p[1] + offset for p in d["timeline"]], where="post", label=name, linewidth=1.8)
        ax_r.step(t, [p[1] + starting.get(p[0], 0) + offset for p in d["timeline"]], where="post", linestyle=":",
                  color=line.get_color(), linewidth=1.2)
    fixed = sorted(n for n, d in result["deployments"].items() if not d["autoscaled"])
    ax_r.set_ylabel("live replicas (dotted: + starting)")
    ax_r.set_ylim(0, 0.4 + max([d["max"] for d in scaled.values()] or [1]))
    ax_r.set_yticks(range(0, 1 + max([d["max"] for d in scaled.values()] or [1])))
    ax_r.legend(loc="upper left", fontsize=8)
    ax_r.set_title(f"replicas per autoscaled deployment ({', '.join(fixed)}: fixed)", fontsize=9)
    series = np.array(result["throughput_1s"] or [[0, 0, 0]], dtype=float)
    ax_q.plot(series[:, 0], series[:, 1], color="tab:blue", label="answered req/s (1 s bins)")
    ax_q.set_ylabel("req/s")
    ax_q.set_xlabel("s since the idle phase began")
    ax_c = ax_q.twinx()
    ax_c.step(series[:, 0], series[:, 2] * len(result["plan"]["modalities"]), where="post", color="tab:gray",
              linestyle="--", label="concurrent callers")
    ax_c.set_ylabel("callers")
    lines = ax_q.get_legend_handles_labels()[0] + ax_c.get_legend_handles_labels()[0]
    ax_q.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    for i, p in enumerate(result["phases"]):
        at_max = p["name"] == "hold after scale-up"  # a part of "hold": marked by a line, labelled higher up
        for ax in (ax_r, ax_q):
            if at_max:
                ax.axvline(p["start_s"], color="k", linestyle="--", linewidth=0.8)
            else:
                ax.axvspan(p["start_s"], p["end_s"], color="k", alpha=0.06 if i % 2 else 0.0)
        p99 = f"p99 {p['p99_ms']:.0f} ms" if p["p99_ms"] is not None else ""
        ax_r.text((p["start_s"] + p["end_s"]) / 2, 0.5 if at_max else 0.03, f"{p['name']}\n{p['qps']:.0f} req/s\n{p99}",
                  transform=ax_r.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)
    clip_s = result["plan"]["audio_clip_s"]
    fig.suptitle(f"Autoscaling under a Recommend ramp (text, image and {clip_s:.0f} s audio queries)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """summary.json's part: per autoscaled deployment min / max seen / final and when, per phase req/s and p99."""
    return {"went_min_max_min": result["went_min_max_min"],
            "deployments": {n: {k: d[k] for k in ("min", "max_seen", "final", "first_upscale_s", "first_at_max_s",
                                                  "back_at_min_s")}
                            for n, d in result["deployments"].items() if d["autoscaled"]},
            "phases": {p["name"]: {"qps": p["qps"], "p99_ms": p["p99_ms"]} for p in result["phases"]}}


def write(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "autoscale.json"
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"))
    return path


def run_autoscale(config: Path, out_dir: Path, plan: AutoscalePlan | None = None, target: str | None = None,
                  ray_address: str = "auto", log: Log = print) -> dict[str, Any]:
    """Start the app on a fresh store with a small sample catalog (or, with `target`, use the running one),
    run the plan, write autoscale.{json,png}."""
    from fusionrec.bench.encode import sample_inputs
    from fusionrec.cli.catalog import catalog_batches
    from fusionrec.cli.client import Client
    from fusionrec.cli.sample_catalog import generate_catalog
    from fusionrec.core.paths import shared_path
    from fusionrec.gateway.runtime import connect, render_config, start, stop

    plan = plan or AutoscalePlan()
    with tempfile.TemporaryDirectory(prefix="fusionrec-autoscale-") as tmp:
        catalog = generate_catalog(Path(tmp) / "catalog", shared_path("media"), n_items=48, n_users=4)
        inputs = sample_inputs(catalog.catalog_path)
        overrides = {"server": {"port": 0, "metrics_port": 0}, "store": {"uri": str(Path(tmp) / "autoscale.db"),
                                                      "content_uri": str(Path(tmp) / "content")}}
        rendered = render_config(config, overrides if target is None else None)
        if target is not None:
            connect(ray_address)
            app_name = rendered["applications"][0].get("name", "fusionrec")
            result = measure(target, app_name, replica_bounds(rendered), inputs, plan, log)
        else:
            running = start(config, overrides=overrides)
            try:
                client = Client(running.target)
                for batch in catalog_batches(catalog.catalog_path, 16):
                    client.stub.UpsertItems(pb.UpsertItemsRequest(items=batch), timeout=300)
                result = measure(running.target, running.app_name, replica_bounds(rendered), inputs, plan, log)
            finally:
                stop()
    result["config"] = str(config)
    path = write(result, out_dir)
    log(f"wrote {path} and {path.with_suffix('.png')}")
    return result
