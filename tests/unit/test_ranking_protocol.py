"""The offline ranking protocol on a small real-shaped data set: candidate lists from a real fusion model,
selection on valid only, per-user metrics, paired tests and the report files."""

from __future__ import annotations

import numpy as np
import pytest

from fusionrec.fusion.registry import get_fusion_model
from fusionrec.fusion.train.data import InteractionData
from fusionrec.ranking import train as ranking_train
from fusionrec.ranking.evaluate import paired_tests
from fusionrec.ranking.report import write_ranking_report
from fusionrec.fusion.train.metrics import per_user_metrics
from fusionrec.ranking.train import build_candidates, reorder, select_and_fit

N_USERS, N_ITEMS, DIM = 120, 90, 8


@pytest.fixture(scope="module")
def data() -> InteractionData:
    """Users draw from 3 content clusters; held-out items favour popular ones (a signal beside content)."""
    rng = np.random.default_rng(0)
    cluster = rng.integers(0, 3, N_ITEMS)
    centers = rng.normal(size=(3, DIM))
    text = (centers[cluster] + 0.7 * rng.normal(size=(N_ITEMS, DIM))).astype(np.float32)
    appeal = rng.pareto(1.5, N_ITEMS) + 0.1
    rows = {"train": [], "valid": [], "test": []}
    for u in range(N_USERS):
        pool = np.flatnonzero(cluster == u % 3)
        picks = rng.choice(pool, 14, replace=False, p=appeal[pool] / appeal[pool].sum())
        for part, chunk in (("train", picks[:10]), ("valid", picks[10:12]), ("test", picks[12:])):
            rows[part] += [(u, int(i)) for i in chunk]
    arrays = {k: np.asarray(v, np.int64) for k, v in rows.items()}
    return InteractionData(name="tiny", n_users=N_USERS, n_items=N_ITEMS, features={"text": text},
                           encoder_versions={"text": "t@1"}, split="synthetic", **arrays)


def test_candidates_selection_and_report(data, tmp_path, monkeypatch):
    monkeypatch.setattr(ranking_train, "ROUNDS", (10, 30))  # a small grid: this is about the protocol
    model = get_fusion_model("weighted-v0", data.modality_dims(), block_dim=4)
    cs = build_candidates(model, data, 30)
    assert cs.items.shape == (N_USERS, 30) and cs.x.shape == (N_USERS * 30, len(cs.feature_names))
    train_items = data.user_items("train")
    assert all(not set(cs.items[r]) & set(train_items[u]) for r, u in enumerate(cs.users))  # seen items excluded
    assert "attr_match" not in cs.feature_names and "pop_log" in cs.feature_names  # never-known columns dropped

    ranker, selection = select_and_fit(cs, data.user_items("valid"), seed=0)
    assert len(selection["trials"]) == 2 * 2 * 2 and set(selection["chosen"]) == {"num_leaves", "base_scale",
                                                                                  "num_boost_round"}
    best = sorted(selection["trials"], key=lambda t: -t["valid_ndcg@20"])[:ranking_train.AVERAGE_TOP]
    assert selection["averaged"] == [{k: t[k] for k in selection["chosen"]} for t in best]  # the best few on valid
    assert selection["averaged"][0] == selection["chosen"] and len(ranker.members) == ranking_train.AVERAGE_TOP
    test = data.user_items("test")
    pos = np.arange(len(cs.users))
    positives = [test[u] for u in cs.users]
    ranked = reorder(cs, pos, ranker.predict(cs.rows(pos)), 20)
    per_user = {"retrieval": per_user_metrics(cs.items[:, :20], positives, (20,)),
                "ranking": per_user_metrics(ranked, positives, (20,))}
    runs = [{"per_user": {v: {"users": cs.users, **m} for v, m in per_user.items()}}] * 3  # as three seeds
    tests = paired_tests(runs, "ranking")
    gain = tests["ndcg@20"]["mean_diff"]
    assert gain > 0 and tests["ndcg@20"]["p_wilcoxon"] < 0.05  # popularity is learnable from valid here
    assert len(tests["recall@20"]["per_seed_p_wilcoxon"]) == 3

    summary = {v: {k: {"mean": 0.1, "std": 0.01} for k in ("ndcg@20", "recall@20", "ndcg@10", "recall@10",
                                                           "coverage@20")} for v in ("retrieval", "ranking")}
    run = {"seed": 0, "selection": selection, "features": cs.feature_names, "importance": ranker.importance(),
           "positives_in_candidates": 0.5, "lists_s": 0.1, "fit_s": 0.1}
    md = write_ranking_report({"dataset": "tiny", "split": "synthetic", "seeds": [0, 1, 2], "candidates_n": 30,
                               "mmr_lambda": None, "retrieval_model": "weighted-v0", "summary": summary,
                               "tests": {"ranking": tests}, "runs": [run], "wall_s": 1.0}, tmp_path)
    text = md.read_text()
    assert f"| ranking | ndcg@20 | {gain:+.4f} |" in text
    assert (tmp_path / "ranking-tiny.png").stat().st_size > 0 and (tmp_path / "ranking-tiny.json").exists()


def test_mmr_lambda_is_chosen_on_the_valid_selection_half(data, monkeypatch):
    from fusionrec.ranking.evaluate import K, choose_mmr_lambda
    from fusionrec.ranking.train import fit_ranker, valid_halves

    monkeypatch.setattr(ranking_train, "ROUNDS", (10, 30))
    cs = build_candidates(get_fusion_model("weighted-v0", data.modality_dims(), block_dim=4), data, 30)
    valid = data.user_items("valid")
    _, selection = select_and_fit(cs, valid, seed=0)
    lam, by_lambda = choose_mmr_lambda(cs, valid, 0, selection["chosen"], lambdas=(0.0, 0.5, 1.0))
    assert set(by_lambda) == {0.0, 0.5, 1.0} and by_lambda[lam] == max(by_lambda.values())
    # λ = 1 is the ranker's own order: its score is the fit-half ranker's NDCG on the selection half
    _, fit_pos, sel_pos = valid_halves(cs, valid, 0)
    scores = fit_ranker(cs, valid, fit_pos, selection["chosen"], 0).predict(cs.rows(sel_pos))
    plain = per_user_metrics(reorder(cs, sel_pos, scores, K), [valid[u] for u in cs.users[sel_pos]], (K,))
    assert by_lambda[1.0] == pytest.approx(float(plain[f"ndcg@{K}"].mean()))
    assert by_lambda[0.0] != pytest.approx(by_lambda[1.0])  # pure diversity reorders the lists
