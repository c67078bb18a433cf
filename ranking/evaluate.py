"""The ranking protocol behind `fusionrec eval-ranking`: retrieval-only vs ranking (vs ranking + MMR) over seeds.

Per seed: train the retrieval model (the quality protocol's own training and checkpoint export), load
it through the serving class, take each user's top N candidates, fit the ranker on valid labels
(hyper-parameters chosen on valid only), and score every variant on test with the same metric
functions as the quality reports; paired tests over users compare ranking with retrieval-only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fusionrec.core.paths import home
from fusionrec.fusion.train.data import InteractionData, load_dataset
from fusionrec.fusion.train.metrics import per_user_metrics, ranking_metrics
from fusionrec.ranking.mmr import mmr_order
from fusionrec.ranking.train import CandidateSet, build_candidates, fit_averaged, reorder, select_and_fit, valid_halves

#: The retrieval model each seed trains: the full variant's net (graph, ids, every content modality).
RETRIEVAL_VARIANT = "full"
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "coverage@20")
K = 20
PAIRED = (f"ndcg@{K}", f"recall@{K}")
#: MMR λ values tried on the valid split (``mmr_lambda="valid"``): the ranker's selection half scores each.
MMR_LAMBDAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def retrieval_checkpoints(dataset: str, seeds: tuple[int, ...], members: int, workers: int, retrain: bool,
                          echo: Callable[[str], None] = print, config: dict[str, Any] | None = None
                          ) -> dict[int, str]:
    """Seed -> checkpoint of the retrieval model trained under that seed, trained where none is recorded yet.

    Trained checkpoints are recorded in ``$FUSIONREC_HOME/checkpoints/ranking-retrieval.json`` so a rerun
    reuses them (``retrain`` trains again). Training jobs go through the quality protocol's job cache, so
    nets `fusionrec evaluate` already trained under the same code are not trained twice.
    """
    from fusionrec.fusion.train.job_cache import JobCache
    from fusionrec.fusion.train.quality import ensemble_run, member_specs, run_jobs

    manifest_path = home("checkpoints", "ranking-retrieval.json")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    config = dict(config or {})
    suffix = "".join(f"/{k}={json.dumps(v)}" for k, v in sorted(config.items()))  # TrainConfig overrides
    key = {s: f"{dataset}/{RETRIEVAL_VARIANT}/members{members}/seed{s}{suffix}" for s in seeds}
    todo = [s for s in seeds if retrain or not Path(manifest.get(key[s], "/nonexistent")).exists()]
    if todo:
        echo(f"training the retrieval model ({RETRIEVAL_VARIANT}, {members} net(s)) for seeds {todo} ...")
        specs = [spec for s in todo for spec in member_specs(dataset, RETRIEVAL_VARIANT, s, members, config)]
        runs = run_jobs(specs, workers, None if retrain else JobCache(home("cache", "quality-jobs")))
        data = load_dataset(dataset)
        for s in todo:
            run = ensemble_run(data, RETRIEVAL_VARIANT, s, members, config, runs, export=True)
            manifest[key[s]] = str(Path(run["checkpoint"]).resolve())
            manifest_path.parent.mkdir(parents=True, exist_ok=True)
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return {s: manifest[key[s]] for s in seeds}


def choose_mmr_lambda(cs: CandidateSet, valid: list[np.ndarray], seed: int,
                      chosen: dict[str, Any] | list[dict[str, Any]], lambdas: tuple[float, ...] = MMR_LAMBDAS
                      ) -> tuple[float, dict[str, float]]:
    """The MMR λ with the best valid NDCG@K on the ranker's selection half, the ranker refitted with the
    ``chosen`` parameters (one set, or the sets an averaged ranker averages) on the fit half only (test
    labels never seen). Returns (λ, NDCG@K per λ)."""
    _, fit_pos, sel_pos = valid_halves(cs, valid, seed)
    scores = fit_averaged(cs, valid, fit_pos, chosen, seed).predict(cs.rows(sel_pos))
    positives = [valid[u] for u in cs.users[sel_pos]]
    by_lambda = {lam: float(per_user_metrics(_mmr_topk(cs, sel_pos, scores, lam), positives, (K,))[f"ndcg@{K}"].mean())
                 for lam in lambdas}
    return max(by_lambda, key=by_lambda.get), by_lambda


def seed_run(data: InteractionData, checkpoint: str, seed: int, candidates_n: int,
             mmr_lambda: float | str | None, ranker_dir: Path | None = None) -> dict[str, Any]:
    """One seed: candidates from ``checkpoint``, a ranker chosen and fitted on valid, every variant on test.

    ``mmr_lambda``: a fixed λ for the ranking + MMR variant, "valid" to choose it on valid
    (choose_mmr_lambda), None for no MMR variant.

    Returns metrics per variant, per-user NDCG@20 / Recall@20 (for the paired tests), the selection record
    and the ranker's feature importance.
    """
    from fusionrec.fusion.registry import get_fusion_model

    t0 = time.perf_counter()
    model = get_fusion_model("trained", data.modality_dims(), checkpoint=checkpoint,
                             encoder_versions=data.encoder_versions)
    cs = build_candidates(model, data, candidates_n)
    lists_s = time.perf_counter() - t0
    ranker, selection = select_and_fit(cs, data.user_items("valid"), seed, K)
    test = data.user_items("test")
    pos = np.flatnonzero([len(test[u]) > 0 for u in cs.users])
    positives = [test[u] for u in cs.users[pos]]
    scores = ranker.predict(cs.rows(pos))
    variants = {"retrieval": cs.items[pos, :K], "ranking": reorder(cs, pos, scores, K)}
    if mmr_lambda == "valid":
        lam, selection["mmr_valid_ndcg"] = choose_mmr_lambda(cs, data.user_items("valid"), seed,
                                                                  selection["averaged"])
        selection["mmr_lambda"] = lam
        variants["ranking+mmr(λ on valid)"] = _mmr_topk(cs, pos, scores, lam)
    elif mmr_lambda is not None:
        variants[f"ranking+mmr(λ={mmr_lambda})"] = _mmr_topk(cs, pos, scores, float(mmr_lambda))
    out: dict[str, Any] = {"seed": seed, "checkpoint": checkpoint, "selection": selection,
                           "features": cs.feature_names, "importance": ranker.importance(),
                           "lists_s": round(lists_s, 1), "fit_s": round(time.perf_counter() - t0 - lists_s, 1),
                           "users": int(len(pos)), "metrics": {}, "per_user": {}}
    for name, topk in variants.items():
        out["metrics"][name] = ranking_metrics(topk, positives, data.n_items, (10, K))
        per_user = per_user_metrics(topk, positives, (K,))
        out["per_user"][name] = {"users": cs.users[pos].tolist(), **{m: per_user[m].tolist() for m in PAIRED}}
    out["positives_in_candidates"] = float(np.mean([np.isin(p, c).mean() for p, c in zip(positives, cs.items[pos])]))
    if ranker_dir is not None:
        out["ranker"] = str(ranker.save(Path(ranker_dir) / f"ranker-{data.name}-seed{seed}.json"))
    return out


def _mmr_topk(cs: CandidateSet, pos: np.ndarray, scores: np.ndarray, lambda_: float) -> np.ndarray:
    """Top K per user after MMR over the ranker's scores and the served item vectors."""
    per_user = scores.reshape(len(pos), -1)
    return np.stack([cs.items[p][mmr_order(per_user[r], cs.vectors[cs.items[p]], K, lambda_)]
                     for r, p in enumerate(pos)])


def paired_tests(runs: list[dict[str, Any]], variant: str, base: str = "retrieval") -> dict[str, Any]:
    """``variant`` vs ``base`` over users (fusion.train.significance: each user's mean over seeds, paired
    t-test and Wilcoxon signed-rank), plus the Wilcoxon p of each seed alone."""
    from fusionrec.fusion.train.significance import compare, paired_test, seed_mean

    pooled = compare([r["per_user"][variant] for r in runs], [r["per_user"][base] for r in runs], variant, base,
                     PAIRED)
    for metric in PAIRED:
        pooled[metric]["per_seed_p_wilcoxon"] = [
            paired_test(seed_mean([r["per_user"][variant]], metric), seed_mean([r["per_user"][base]], metric))
            ["p_wilcoxon"] for r in runs]
    return pooled


def evaluate_ranking(dataset: str, seeds: tuple[int, ...] = (0, 1, 2), candidates_n: int = 100,
                     mmr_lambda: float | str | None = "valid", members: int = 1, workers: int = 2, retrain: bool = False,
                     echo: Callable[[str], None] = print, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole protocol on one data set; returns the report (fusionrec.ranking.report writes it)."""
    start = time.perf_counter()
    data = load_dataset(dataset)
    checkpoints = retrieval_checkpoints(dataset, seeds, members, workers, retrain, echo, config)
    runs = []
    for s in seeds:
        runs.append(seed_run(data, checkpoints[s], s, candidates_n, mmr_lambda, home("checkpoints")))
        m = runs[-1]["metrics"]
        echo(f"seed {s}: " + ", ".join(f"{v} NDCG@{K} {x[f'ndcg@{K}']:.4f}" for v, x in m.items()))
    variants = list(runs[0]["metrics"])
    summary = {v: {k: {"mean": float(np.mean([r["metrics"][v][k] for r in runs])),
                       "std": float(np.std([r["metrics"][v][k] for r in runs]))} for k in METRICS}
               for v in variants}
    return {"dataset": dataset, "split": data.split, "seeds": list(seeds), "candidates_n": candidates_n,
            "mmr_lambda": mmr_lambda, "config": dict(config or {}),
            "retrieval_model": f"{RETRIEVAL_VARIANT} ({members} net(s) per seed"
                               + "".join(f", {k}={v}" for k, v in sorted((config or {}).items())) + ")",
            "summary": summary, "tests": {v: paired_tests(runs, v) for v in variants if v != "retrieval"},
            "runs": [{k: v for k, v in r.items() if k != "per_user"} for r in runs],
            "wall_s": round(time.perf_counter() - start, 1)}
