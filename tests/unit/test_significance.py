"""Paired significance over users, per-user metrics and coverage@k: the helpers behind the quality reports."""

import numpy as np
import pytest

from fusionrec.fusion.train.metrics import coverage_at, per_user_metrics, ranking_metrics
from fusionrec.fusion.train.significance import compare, paired_test, seed_mean


def test_per_user_metrics_average_to_the_reported_means_and_skip_users_without_positives():
    topk = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    positives = [np.array([1, 9]), np.array([], dtype=np.int64), np.array([6])]
    per_user = per_user_metrics(topk, positives, (2,))
    np.testing.assert_allclose(per_user["recall@2"], [0.5, 1.0])
    np.testing.assert_allclose(per_user["ndcg@2"], [1 / np.log2(3) / (1 + 1 / np.log2(3)), 1.0])
    means = ranking_metrics(topk, positives, n_items=20, ks=(2,))
    assert means["recall@2"] == pytest.approx(0.75) and means["users"] == 2
    # Coverage counts the distinct items in the top k of the users with a positive: {0, 1, 6, 7} of 20.
    assert means["coverage@2"] == pytest.approx(4 / 20)


def test_coverage_is_the_share_of_the_catalogue_recommended_to_anyone():
    topk = np.array([[0, 1, 2], [0, 1, 3]])
    assert coverage_at(topk, 10, 2) == pytest.approx(0.2)
    assert coverage_at(topk, 10, 3) == pytest.approx(0.4)
    assert coverage_at(np.zeros((0, 3), dtype=np.int64), 10, 3) == 0.0


def _runs(values: np.ndarray, users: np.ndarray) -> dict:
    return {"users": users, "recall@20": values, "ndcg@20": values / 2}


def test_a_consistent_gain_is_significant_and_noise_is_not():
    rng = np.random.default_rng(0)
    users = np.arange(400)
    base = rng.random(400)
    better = [_runs(base + 0.05 + rng.normal(0, 0.05, 400), users) for _ in range(3)]
    noise = [_runs(base + rng.normal(0, 0.05, 400), users) for _ in range(3)]
    reference = [_runs(base, users)]
    win = compare(better, reference, "a", "b")
    assert win["recall@20"]["mean_diff"] == pytest.approx(0.05, abs=0.01)
    assert win["recall@20"]["p_ttest"] < 1e-6 and win["recall@20"]["p_wilcoxon"] < 1e-6
    assert win["recall@20"]["wins"] > win["recall@20"]["losses"]
    assert win["seeds_a"] == 3 and win["ndcg@20"]["users"] == 400
    tie = compare(noise, reference, "a", "b")
    assert tie["recall@20"]["p_ttest"] > 0.01


def test_seed_mean_averages_seeds_per_user_and_refuses_different_users():
    users = np.array([4, 9])
    mean = seed_mean([_runs(np.array([0.0, 1.0]), users), _runs(np.array([1.0, 1.0]), users)])
    assert mean == {4: 0.5, 9: 1.0}
    with pytest.raises(ValueError, match="different users"):
        seed_mean([_runs(np.array([0.0, 1.0]), users), _runs(np.array([0.0, 1.0]), np.array([4, 8]))])


def test_paired_test_uses_common_users_and_handles_identical_models():
    same = paired_test({1: 0.2, 2: 0.4, 3: 0.1}, {1: 0.2, 2: 0.4, 3: 0.1, 7: 1.0})
    assert same["users"] == 3 and same["p_ttest"] == 1.0 and same["p_wilcoxon"] == 1.0
    with pytest.raises(ValueError, match="at least 2 common users"):
        paired_test({1: 0.2}, {1: 0.3, 2: 0.1})
