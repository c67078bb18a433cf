"""Quality reports on disk: <dataset>.json, <dataset>.md (tables) and <dataset>.png (ablation bars + curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(mean: float, std: float | None = None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _row_fmt(row: dict[str, Any], key: str) -> str:
    """``mean ± std`` of a table row's metric (the mean alone for one run or rows without stds)."""
    std = row.get("std", {}).get(key)
    return _fmt(row[key], std if row.get("seeds", 1) > 1 and std is not None else None)


def _significance_lines(sig: dict[str, Any]) -> list[str]:
    """The paired-test table: full model against its best single modality and best peer (both chosen on valid)."""
    if not sig:
        return []
    lines = ["", "## Paired significance over test users (full model vs the best on valid)", "",
             "Per-user metrics averaged over each model's seeds, then a two-sided paired t-test and a Wilcoxon "
             "signed-rank test over the users both were scored on.", "",
             "| full vs | metric | full | other | diff | users (wins/losses) | p (t-test) | p (Wilcoxon) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, c in sig.items():
        label = {"vs_best_single_modality": "best single modality", "vs_best_peer": "best peer"}.get(key, key)
        for m in ("recall@20", "ndcg@20"):
            p = c[m]
            lines.append(f"| {label}: {c['b']} ({c['seeds_b']} seeds) | {m} | {p['mean_a']:.4f} | {p['mean_b']:.4f} "
                         f"| {p['mean_diff']:+.4f} | {p['users']} ({p['wins']}/{p['losses']}) | {p['p_ttest']:.2g} "
                         f"| {p['p_wilcoxon']:.2g} |")
    return lines


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
    per_seed = [r for r in report["runs"] if r["variant"] == "full" and "member" not in r]
    lines += ["", "Per seed (test Recall@20): " + ", ".join(f"{r['test_recall@20']:.4f} (seed {r['seed']})"
                                                           for r in per_seed) + "."]
    lines += ["", "## Ours vs references (test @20; mean ± std over seeds)", "",
              "| model | seeds | Recall@20 | NDCG@20 | coverage@20 |", "|---|---|---|---|---|",
              f"| **ours (full, served path)** | {len(t['seeds'])} | **{_fmt(t['recall@20'], s['recall@20'])}** | "
              f"**{_fmt(t['ndcg@20'], s['ndcg@20'])}** | {_fmt(t['coverage@20'], s['coverage@20'])} |"]
    for k, v in report["baselines"].items():
        lines.append(f"| {k} (measured here) | {v['seeds']} | {_row_fmt(v, 'recall@20')} | {_row_fmt(v, 'ndcg@20')} "
                     f"| {_row_fmt(v, 'coverage@20')} |")
    for k, v in report.get("peers", {}).items():
        nd = "–" if v["ndcg@20"] is None else f"{v['ndcg@20']:.3f}"
        lines.append(f"| {k} (MMRec, issue 3) | – | {v['recall@20']:.3f} | {nd} | – |")
    lines += _significance_lines(report.get("significance", {}))
    lines += ["", f"## Ablations and user towers (test; mean ± std over seeds {report['ablation_seeds']} unless "
              "noted; valid Recall@20 is what choices are made on)", "",
              "| variant | seeds | Recall@20 | NDCG@20 | coverage@20 | Recall@10 | NDCG@10 | valid Recall@20 |",
              "|---|---|---|---|---|---|---|---|"]
    for v, r in report["ablation"].items():
        lines.append(f"| {v} | {r['seeds']} | {_row_fmt(r, 'recall@20')} | {_row_fmt(r, 'ndcg@20')} | "
                     f"{_row_fmt(r, 'coverage@20')} | {r['recall@10']:.4f} | {r['ndcg@10']:.4f} | "
                     f"{r.get('valid_recall@20', float('nan')):.4f} |")
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


def curve_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training curves plotted: the full model's first net per seed, on the full data only (the cold
    split's first net is another model and once appeared as a second "seed 0")."""
    return [r for r in results if r["variant"] == "full" and r.get("member") == 0 and not r.get("cold")]


def _plot(report: dict[str, Any], results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = list(report["ablation"])
    rows = [report["ablation"][v] for v in names]
    vals = [r["recall@20"] for r in rows]
    errs = [r.get("std", {}).get("recall@20", 0.0) if r["seeds"] > 1 else 0.0 for r in rows]
    ax1.bar(names, vals, yerr=errs, capsize=3, color=["tab:red" if v == "full" else "tab:blue" for v in names])
    lightgcn = report["baselines"].get("lightgcn (ours, per-user embeddings)")
    refs = vals + ([lightgcn["recall@20"]] if lightgcn else [])
    if lightgcn:
        ax1.axhline(lightgcn["recall@20"], ls="--", c="k", label="LightGCN (measured here)")
        ax1.legend(loc="lower right")
    # Bars start near the lowest value, not at 0: the differences are a few points of Recall.
    low, high = min(refs) - max(errs + [0.0]), max(refs) + max(errs + [0.0])
    ax1.set_ylim(max(0.0, low - 0.1 * (high - low) - 0.005), high + 0.1 * (high - low) + 0.005)
    ax1.set_ylabel("test Recall@20 (mean ± std over seeds)")
    ax1.set_title(f"{report['dataset']}: ablations and user towers (y axis cut)")
    ax1.tick_params(axis="x", rotation=35)
    for r in curve_runs(results):
        ax2.plot([c["epoch"] for c in r["curve"]], [c["valid_recall@20"] for c in r["curve"]],
                 label=f"full seed {r['seed']}, first net (train seed {r['train_seed']})")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("valid Recall@20")
    ax2.set_title("training curves")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
