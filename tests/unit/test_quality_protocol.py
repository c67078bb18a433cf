"""The quality protocol end to end on a small synthetic data set: seeds, ablations, towers, paired tests, report."""

import json

import pytest
import torch

from fusionrec.fusion.train import data as data_module
from fusionrec.fusion.train.job_cache import JobCache
from fusionrec.fusion.train.quality import evaluate_dataset, run_jobs
from fusionrec.fusion.train.report import curve_runs
from test_trained_fusion import _synthetic


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One protocol run (2 seeds, 2-net ensembles, in this process) on the synthetic two-cluster data."""
    torch.set_num_threads(1)
    data_module.LOADERS["synthetic"] = lambda *_: _synthetic(n_users=60)
    out = tmp_path_factory.mktemp("quality")
    try:
        rep = evaluate_dataset("synthetic", seeds=(0, 1), ablation_seeds=(0, 1), workers=1, out_dir=out,
                               cold=False, resume=False, members=2, config={"epochs": 2, "patience": 2, "block_dim": 8, "hidden": 16,
                                                  "batch_users": 16, "user_tower": "gru",
                                                  "prefix_share": 0.5})
    finally:
        del data_module.LOADERS["synthetic"]
    return rep, out


def test_every_variant_runs_over_the_seeds_with_spread_and_valid_figures(report):
    rep, _ = report
    rows = rep["ablation"]
    # The full model uses the configured GRU tower; the other tower still runs as itself.
    assert {"id", "text", "audio", "full", "full (one net)", "full-attention"} <= set(rows)
    assert "full-gru" not in rows and "gru user tower" in rep["model"]
    for name, row in rows.items():
        assert row["seeds"] == (4 if name == "full (one net)" else 2), name
        assert set(row["std"]) >= {"recall@20", "ndcg@20", "coverage@20"} and 0 <= row["coverage@20"] <= 1
        assert 0 <= row["valid_recall@20"] <= 1
    assert rep["baselines"]["lightgcn (ours, per-user embeddings)"]["seeds"] == 2


def test_full_model_is_tested_against_the_best_on_valid(report):
    rep, _ = report
    sig = rep["significance"]
    single = sig["vs_best_single_modality"]
    valid = {v: rep["ablation"][v]["valid_recall@20"] for v in ("id", "text", "audio")}
    assert single["b"] == max(valid, key=valid.get) and single["seeds_a"] == 2 and single["seeds_b"] == 2
    peer = sig["vs_best_peer"]
    peer_valid = {k: v["valid_recall@20"] for k, v in rep["baselines"].items()}
    assert peer["b"] == max(peer_valid, key=peer_valid.get)
    for c in (single, peer):
        for m in ("recall@20", "ndcg@20"):
            assert 0 <= c[m]["p_ttest"] <= 1 and 0 <= c[m]["p_wilcoxon"] <= 1
            assert c[m]["mean_a"] == pytest.approx(rep["test"][m], abs=1e-9)


def test_report_files_hold_the_tables_and_one_curve_per_seed(report):
    rep, out = report
    saved = json.loads((out / "synthetic.json").read_text())
    assert saved["significance"].keys() == rep["significance"].keys()
    md = (out / "synthetic.md").read_text()
    assert "## Paired significance" in md and "coverage@20" in md and "full-attention" in md
    assert (out / "synthetic.png").stat().st_size > 10_000


def test_training_curves_leave_the_cold_split_out():
    runs = [{"variant": "full", "member": 0, "seed": 0}, {"variant": "full", "member": 0, "seed": 0, "cold": True},
            {"variant": "full", "member": 1, "seed": 0}, {"variant": "full", "member": 0, "seed": 1},
            {"variant": "id", "seed": 0}]
    assert [(r["seed"], r.get("cold")) for r in curve_runs(runs)] == [(0, None), (1, None)]


def test_a_rerun_reuses_finished_jobs_and_trains_only_the_missing_ones(tmp_path, monkeypatch):
    cache = JobCache(tmp_path)
    done = {"dataset": "nowhere", "variant": "id", "seed": 0, "config": {}}
    cache.put(done, {"variant": "id", "marker": 1})
    assert cache.get({**done, "progress": True, "threads": 4}) == {"variant": "id", "marker": 1}
    assert cache.get({**done, "seed": 1}) is None
    # The cached job is not run again (its dataset does not exist); the missing one runs and is stored.
    monkeypatch.setitem(data_module.LOADERS, "synthetic", lambda *_: _synthetic(n_users=30))
    missing = {"dataset": "synthetic", "variant": "id", "seed": 0, "config": {"epochs": 1, "block_dim": 8,
                                                                          "hidden": 16, "batch_users": 16}}
    first = run_jobs([done, missing], workers=1, cache=cache)
    assert first[0]["marker"] == 1 and first[1]["variant"] == "id" and "test" in first[1]
    assert cache.get(missing)["best_epoch"] == first[1]["best_epoch"]


def test_evaluate_overrides_are_typed_config_fields():
    from typer.testing import CliRunner

    from fusionrec.cli.quality import _overrides, quality_app

    assert _overrides(["user_tower=gru", "prefix_share=0.5", "epochs=3"]) == {"user_tower": "gru",
                                                                               "prefix_share": 0.5, "epochs": 3}
    result = CliRunner().invoke(quality_app, ["evaluate", "--dataset", "ml-100k", "--set", "towr=gru"])
    assert result.exit_code != 0 and "towr=gru" in result.output and "user_tower" in result.output
