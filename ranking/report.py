"""Write the ranking report: ranking-<dataset>.json, .md (tables, tests) and .png (metric bars with error bars)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHOWN = ("ndcg@20", "recall@20", "coverage@20")


def write_ranking_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write the three files; returns the .md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"ranking-{report['dataset']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, sort_keys=True))
    stem.with_suffix(".md").write_text("\n".join(_markdown(report)) + "\n")
    _plot(report, stem.with_suffix(".png"))
    return stem.with_suffix(".md")


def _mmr_sentence(mmr_lambda: float | str | None) -> str:
    if mmr_lambda == "valid":
        return ("MMR λ chosen per seed on valid only (λ in 0.5..1.0 by NDCG@20 of the selection half, the ranker "
                "refitted on the fit half); the chosen λ is in the per-seed table.")
    return "No MMR variant." if mmr_lambda is None else f"MMR λ = {mmr_lambda} (a fixed diversity setting, not tuned)."


def _markdown(r: dict[str, Any]) -> list[str]:
    s = r["summary"]
    lines = [f"# Ranking stage: {r['dataset']}", "", f"Split: {r['split']}.", "",
             f"Protocol: retrieval model {r['retrieval_model']}, trained per seed and loaded through the serving "
             f"class; candidates = each user's top {r['candidates_n']} by the retrieval score (user tower over the "
             "train history, train items excluded); the LightGBM lambdarank ranker is fitted on valid labels, its "
             "hyper-parameters chosen on valid only (half the valid users fit, the other half score NDCG@20; the "
             "served ranker averages the scores of the best few settings, refitted on every valid user); test "
             f"labels only score it. Mean ± std over seeds {r['seeds']}; " + _mmr_sentence(r["mmr_lambda"]), "",
             "| variant | NDCG@20 | Recall@20 | NDCG@10 | Recall@10 | coverage@20 |", "|---|---|---|---|---|---|"]
    for v, m in s.items():
        cells = [f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in ("ndcg@20", "recall@20", "ndcg@10",
                                                                     "recall@10", "coverage@20")]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired tests against retrieval-only (over users; each user's mean over seeds)", "",
              "| variant | metric | mean gain | users better / worse | Wilcoxon p | paired t p | per-seed Wilcoxon p |",
              "|---|---|---|---|---|---|---|"]
    for v, tests in r["tests"].items():
        for metric in ("ndcg@20", "recall@20"):
            t = tests[metric]
            seeds_p = ", ".join(f"{p:.2g}" for p in t["per_seed_p_wilcoxon"])
            lines.append(f"| {v} | {metric} | {t['mean_diff']:+.4f} | {t['wins']} / {t['losses']} "
                         f"| {t['p_wilcoxon']:.2g} | {t['p_ttest']:.2g} | {seeds_p} |")
    first = r["runs"][0]
    top = list(first["importance"].items())[:8]
    total = sum(first["importance"].values()) or 1.0
    lines += ["", "## Per seed", "", "| seed | chosen hyper-parameters | retrieval valid NDCG@20 (select half) | "
              "best valid NDCG@20 | test positives among candidates | lists s | fit s |", "|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        sel = run["selection"]
        best = max(t["valid_ndcg@20"] for t in sel["trials"])
        chosen = _chosen_cell(sel)
        lines.append(f"| {run['seed']} | {chosen} | {sel['retrieval_valid_ndcg@20']:.4f} | {best:.4f} | "
                     f"{run['positives_in_candidates']:.3f} | {run['lists_s']} | {run['fit_s']} |")
    lines += ["", f"Features ({len(first['features'])}): {', '.join(first['features'])}.", "",
              "Largest gain shares (seed " + str(first["seed"]) + "): "
              + ", ".join(f"{k} {v / total:.0%}" for k, v in top) + ".", "", f"Wall time: {r['wall_s']} s.", ""]
    return lines


def _chosen_cell(sel: dict[str, Any]) -> str:
    """The chosen setting, or the settings whose scores the ranker averages, plus the MMR λ when chosen."""
    configs = sel.get("averaged") or [sel["chosen"]]
    cell = str(configs[0]) if len(configs) == 1 else f"mean of {len(configs)}: " + "; ".join(
        ", ".join(f"{k}={v}" for k, v in c.items()) for c in configs)
    return cell + (f"; mmr_lambda={sel['mmr_lambda']}" if "mmr_lambda" in sel else "")


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(r["summary"])
    fig, axes = plt.subplots(1, len(SHOWN), figsize=(4.2 * len(SHOWN), 3.6))
    for ax, metric in zip(axes, SHOWN):
        means = [r["summary"][v][metric]["mean"] for v in variants]
        stds = [r["summary"][v][metric]["std"] for v in variants]
        ax.bar(range(len(variants)), means, yerr=stds, capsize=4, color=["#999999", "#1f77b4", "#2ca02c"][:len(variants)])
        low, high = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
        pad = max((high - low) * 0.5, 1e-3)
        ax.set_ylim(max(0.0, low - pad), high + pad)  # an axis that shows the differences
        ax.set_xticks(range(len(variants)), variants, rotation=15, fontsize=8)
        ax.set_title(f"{metric} (mean ± std, {len(r['seeds'])} seeds)", fontsize=9)
    fig.suptitle(f"{r['dataset']}: ranking stage vs retrieval-only (test)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
