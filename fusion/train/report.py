"""Quality reports on disk: <dataset>.json, <dataset>.md (tables) and <dataset>.png (ablation bars + curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(mean: float, std: float | None = None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def write_report(report: dict[str, Any], results: list[dict[str, Any]], out_dir: Path) -> None:
    """<dataset>.json, <dataset>.md (tables) and <dataset>.png (ablation bars + valid curves)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report["dataset"]
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    t, s = report["test"], report["test"]["std"]
    lines = [f"# Quality report: {name}", "", f"Split: {report['split']}.", "", f"Protocol: {report['protocol']}.", "",
             f"Model: {report['model']}.", "", "## Full model (test)", "", "| metric | @10 | @20 |", "|---|---|---|"]
    for m in ("recall", "ndcg", "precision", "coverage"):
        lines.append(f"| {m} | {_fmt(t[f'{m}@10'], s[f'{m}@10'])} | {_fmt(t[f'{m}@20'], s[f'{m}@20'])} |")
    lines += ["", "## Ours vs references (test Recall@20 / NDCG@20)", "", "| model | Recall@20 | NDCG@20 |",
              "|---|---|---|",
              f"| **ours (full, served path)** | **{_fmt(t['recall@20'], s['recall@20'])}** | "
              f"**{_fmt(t['ndcg@20'], s['ndcg@20'])}** |"]
    for k, v in report["baselines"].items():
        lines.append(f"| {k} (measured here) | {v['recall@20']:.4f} | {v['ndcg@20']:.4f} |")
    for k, v in report.get("peers", {}).items():
        nd = "–" if v["ndcg@20"] is None else f"{v['ndcg@20']:.3f}"
        lines.append(f"| {k} (MMRec, issue 3) | {v['recall@20']:.3f} | {nd} |")
    lines += ["", f"## Ablation (test; seeds {report['ablation_seeds']} unless noted)", "",
              "| variant | seeds | Recall@20 | NDCG@20 | Recall@10 | NDCG@10 | coverage@20 |", "|---|---|---|---|---|---|---|"]
    for v, r in report["ablation"].items():
        lines.append(f"| {v} | {r['seeds']} | {_fmt(r['recall@20'], r['std_recall@20'] if r['seeds'] > 1 else None)} "
                     f"| {r['ndcg@20']:.4f} | {r['recall@10']:.4f} | {r['ndcg@10']:.4f} | {r['coverage@20']:.4f} |")
    if "cold_items" in report:
        c = report["cold_items"]
        lines += ["", "## Cold items", "", c["protocol"] + ".", "", "| model | Recall@20 | NDCG@20 |", "|---|---|---|",
                  f"| **ours ({report['members']}-net ensemble, as served)** | **{c['recall@20']:.4f}** | "
                  f"**{c['ndcg@20']:.4f}** |",
                  f"| ours, one net (mean of the members) | {c['one_net_recall@20']:.4f} | {c['one_net_ndcg@20']:.4f} |",
                  f"| content-only ItemKNN (text) | {c['content_knn_recall@20']:.4f} | {c['content_knn_ndcg@20']:.4f} |",
                  "", f"{c['n_cold_items']} cold items, {int(c['users'])} users. Overall test Recall@20 of that ensemble "
                  f"(all items ranked): {c['all_items_recall@20_with_cold_held_out']:.4f}."]
    if "served_check" in report:
        c = report["served_check"]
        lines += ["", "## Served path", "", f"Seed {c['seed']} checkpoint (all {report['members']} nets) loaded through "
                  "`get_fusion_model(\"trained\")`, "
                  "item vectors from raw modality vectors + ids, one `user_vector` call per user: test Recall@20 "
                  f"{c['served_recall@20']:.4f} / NDCG@20 {c['served_ndcg@20']:.4f} (evaluated in training: "
                  f"{c['evaluated_recall@20']:.4f} / {c['evaluated_ndcg@20']:.4f})."]
    lines += ["", f"Checkpoint: `{report['checkpoint']}`. Wall time: {report['wall_s']} s.", ""]
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    _plot(report, results, out_dir / f"{name}.png")


def _plot(report: dict[str, Any], results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(report["ablation"])
    vals = [report["ablation"][v]["recall@20"] for v in names]
    ax1.bar(names, vals, color=["tab:red" if v == "full" else "tab:blue" for v in names])
    ax1.axhline(report["baselines"]["lightgcn (ours, per-user embeddings)"]["recall@20"], ls="--", c="k",
                label="LightGCN (measured here)")
    ax1.set_ylabel("test Recall@20")
    ax1.set_title(f"{report['dataset']}: ablation")
    ax1.tick_params(axis="x", rotation=30)
    ax1.legend()
    for r in results:
        if r["variant"] == "full" and r.get("member") == 0:
            ax2.plot([c["epoch"] for c in r["curve"]], [c["valid_recall@20"] for c in r["curve"]],
                     label=f"full seed {r['seed']}, first net")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("valid Recall@20")
    ax2.set_title("training curves")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
