"""Paired significance over users (scipy): does model A score higher than model B on the same test users?

Each model's per-user metric is first averaged over its seeds (``seed_mean``), so the test asks whether the
model, not one lucky seed, is better; the pairs are the users both models were scored on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats


def seed_mean(per_user_runs: list[dict[str, Any]], metric: str = "recall@20") -> dict[int, float]:
    """User id -> ``metric`` averaged over the runs (each an ``evaluate(..., per_user=True)["per_user"]``).

    Raises:
        ValueError: no runs, or the runs scored different users (their means would not be comparable).
    """
    if not per_user_runs:
        raise ValueError("seed_mean needs at least one run")
    users = np.asarray(per_user_runs[0]["users"])
    for run in per_user_runs[1:]:
        if not np.array_equal(np.asarray(run["users"]), users):
            raise ValueError("runs scored different users; a per-user mean over them is undefined")
    values = np.mean([np.asarray(r[metric], dtype=np.float64) for r in per_user_runs], axis=0)
    return dict(zip(users.tolist(), values.tolist()))


def paired_test(a: dict[int, float], b: dict[int, float]) -> dict[str, float]:
    """Two-sided paired tests of A against B over the users both have.

    Returns:
        {"users", "mean_a", "mean_b", "mean_diff" (A - B), "p_ttest" (paired t-test), "p_wilcoxon"
        (signed-rank, ties dropped; 1.0 when every pair ties), "wins", "losses"}.
    Raises:
        ValueError: fewer than two common users.
    """
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        raise ValueError(f"a paired test needs at least 2 common users, got {len(common)}")
    x = np.asarray([a[u] for u in common])
    y = np.asarray([b[u] for u in common])
    diff = x - y
    p_t = float(stats.ttest_rel(x, y).pvalue) if diff.any() else 1.0
    p_w = float(stats.wilcoxon(x, y, zero_method="wilcox").pvalue) if diff.any() else 1.0
    return {"users": len(common), "mean_a": float(x.mean()), "mean_b": float(y.mean()),
            "mean_diff": float(diff.mean()), "p_ttest": p_t, "p_wilcoxon": p_w,
            "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum())}


def compare(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]], name_a: str, name_b: str,
            metrics: tuple[str, ...] = ("recall@20", "ndcg@20")) -> dict[str, Any]:
    """``paired_test`` of A's seed-mean per-user metrics against B's, for each of ``metrics``.

    Args:
        runs_a, runs_b: the models' ``per_user`` entries, one per seed.
    """
    return {"a": name_a, "b": name_b, "seeds_a": len(runs_a), "seeds_b": len(runs_b),
            **{m: paired_test(seed_mean(runs_a, m), seed_mean(runs_b, m)) for m in metrics}}
