"""reports/reliability.{json,md,png}: every figure, and each target with pass or fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, NamedTuple


class Target(NamedTuple):
    key: str  # "section.field"
    label: str
    passes: Callable[[Any], bool]
    goal: str


TARGETS = (
    Target("hostile.unexpected", "hostile cases with an unexpected status", lambda v: v == 0, "0"),
    Target("hostile.server_alive_after_all", "server alive after every case", lambda v: v is True, "true"),
    Target("faults.lost", "acknowledged writes lost", lambda v: v == 0, "0"),
    Target("overload.admitted_p99_ratio", "admitted p99 / unloaded p99 at 2x saturation",
           lambda v: v is not None and v <= 2, "<= 2"),
    Target("overload.shed_median_ms", "median time to shed, ms", lambda v: v is not None and v <= 10, "<= 10"),
    Target("soak.errors", "failed calls in the soak", lambda v: v == 0, "0"),
    Target("soak.rss_growth_max", "largest replica RSS growth in the soak",
           lambda v: v is not None and v <= 0.05, "<= 0.05"),
)


def _get(report: dict, key: str) -> Any:
    section, name = key.split(".", 1)
    return report.get(section, {}).get(name)


def verdicts(report: dict) -> list[dict[str, Any]]:
    """One row per target whose section ran: value, goal, pass."""
    return [{"key": t.key, "label": t.label, "value": _get(report, t.key), "goal": t.goal,
             "pass": t.passes(_get(report, t.key))} for t in TARGETS if t.key.split(".")[0] in report]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "n/a" if value is None else str(value)


def markdown(report: dict) -> str:
    lines = [f"# Reliability report ({report.get('date', '')})", "",
             f"Service: `{report.get('config', '')}`; {report.get('note', '')}", "",
             "| target | value | goal | result |", "|---|---|---|---|"]
    for v in report["verdicts"]:
        lines.append(f"| {v['label']} (`{v['key']}`) | {_fmt(v['value'])} | {v['goal']} | "
                     f"{'pass' if v['pass'] else '**FAIL**'} |")
    sections = {"hostile": _hostile_md, "faults": _faults_md, "overload": _overload_md, "soak": _soak_md}
    for name, section_md in sections.items():
        found = report.get(name)
        if found and "error" in found:
            lines += ["", f"## {name}", "", f"**Could not run**: `{found['error']}`"]
        else:
            lines += section_md(found)
    return "\n".join(lines) + "\n"


def _hostile_md(h: dict | None) -> list[str]:
    if not h:
        return []
    out = ["", "## Hostile input", "",
           f"{h['cases']} distinct cases over {', '.join(h['rpcs'])}; {h['unexpected']} unexpected; "
           f"server alive after all: {h['server_alive_after_all']}."]
    if h["unexpected_cases"]:
        out += ["", "| case | expected | got | message |", "|---|---|---|---|"]
        out += [f"| {c['name']} | {'/'.join(c['expected'])} | {c['got']} | {c['message'][:90]} |"
                for c in h["unexpected_cases"]]
    return out


def _faults_md(f: dict | None) -> list[str]:
    if not f:
        return []
    out = ["", "## Faults under write + read load", "",
           f"{f['acknowledged']} writes acknowledged, {f['lost']} lost; acknowledged ids GetItem missed during "
           f"the load: {f['read_missing_during_load']}.", "",
           "| killed (kill -9) | recovery, s | calls failed meanwhile |", "|---|---|---|"]
    out += [f"| {name} | {'**not recovered** in time' if s is None else _fmt(s)} | "
            f"{f.get('failed_calls', {}).get(name, 'n/a')} |" for name, s in f["recovery_s"].items()]
    out += ["", f"Calls that failed during the faults (the caller was told): `{f['calls_failed']}`"]
    return out


def _overload_md(o: dict | None) -> list[str]:
    if not o:
        return []
    return ["", "## Overload", "",
            f"Saturation {o['saturation_qps']:.0f} req/s (closed-loop ramp, {o['saturation_concurrency']} callers); "
            f"unloaded p99 {o['unloaded_p99_ms']:.1f} ms. Offered {o['offered_qps']:.0f} req/s open-loop "
            f"(sent {o['sent_qps']:.0f}, p99 {o.get('send_lag_p99_ms', 0):.0f} ms late), "
            f"deadline {o['deadline_ms']:.0f} ms: admitted p50 "
            f"{_fmt(o['admitted_p50_ms'])} ms, p99 {_fmt(o['admitted_p99_ms'])} ms (calls sent after the first 2 s: "
            f"{_fmt(o.get('admitted_p99_after_2s_ms'))} ms), {_fmt(o.get('admitted_qps'))} req/s admitted; shed "
            f"{o['shed_fraction']:.1%} (median {_fmt(o['shed_median_ms'])} ms); other failures "
            f"{o['failed_other_fraction']:.1%}; codes `{o['codes']}`. After the ramp, settled "
            f"`{o.get('settle', {})}`; replicas started during the surge: `{o.get('replicas_started_during', {})}`."]


def _soak_md(s: dict | None) -> list[str]:
    if not s:
        return []
    out = ["", "## Soak", "",
           f"{s['duration_s']:.0f} s of mixed traffic after a {s['warmup_s']:.0f} s warm-up: calls ok "
           f"`{s['calls_ok']}`, failed {s['errors']} `{s['errors_by_call']}`.", "",
           f"RSS growth per replica (end of warm-up to end): {_growth_text(s['rss_growth'])}."]
    if s.get("rss_growth_median"):
        out.append(f"Between the medians of the first and the last minute of samples (a sample at a flush's peak "
                   f"or trough does not move it): {_growth_text(s['rss_growth_median'])}.")
    return out


def _growth_text(growth: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:+.1%}" for k, v in sorted(growth.items()))


def plot(report: dict, path: Path) -> bool:
    """RSS per replica over the soak; False when there is no soak to plot."""
    soak = report.get("soak")
    if not soak or not soak.get("rss_mb"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in sorted({k for s in soak["rss_mb"] for k in s if k != "t_s"}):
        points = [(s["t_s"], s[name]) for s in soak["rss_mb"] if name in s]
        ax.plot(*zip(*points), marker=".", label=name)
    ax.set_xlabel("s since the soak started")
    ax.set_ylabel("RSS, MiB")
    ax.set_title("Replica RSS during the soak")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(report: dict, out_dir: Path) -> Path:
    """reliability.json, .md and (with a soak) .png under ``out_dir``; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report["verdicts"] = verdicts(report)
    path = out_dir / "reliability.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    if plot(report, out_dir / "reliability.png"):
        report["plot"] = "reliability.png"
    md = markdown(report)
    if report.get("plot"):
        md += "\n![replica RSS during the soak](reliability.png)\n"
    (out_dir / "reliability.md").write_text(md)
    return path
