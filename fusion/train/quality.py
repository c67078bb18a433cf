"""The quality protocol behind `fusionrec train` / `fusionrec evaluate`: seeds, ablations, cold items, reports."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fusionrec.core.paths import home, reports_dir
from fusionrec.fusion.train.data import InteractionData, load_dataset
from fusionrec.fusion.train.job_cache import JobCache
from fusionrec.fusion.train.report import write_report

if TYPE_CHECKING:
    from torch import nn

ABLATIONS = ("id", "text", "audio", "id+text", "id+audio", "text+audio", "full")
METRIC_KEYS = ("recall@10", "ndcg@10", "precision@10", "recall@20", "ndcg@20", "precision@20",
               "coverage@10", "coverage@20")
#: Recall@20 / NDCG@20 on the lfm2k test split, measured with MMRec's code (issue 3).
LFM2K_PEERS = {"MostPop": (0.123, 0.076), "ItemKNN-text (content only)": (0.242, 0.152), "LATTICE": (0.250, None),
               "BM3": (0.306, None), "FREEDOM": (0.388, 0.266), "MGCN": (0.408, 0.283), "LGMRec": (0.412, 0.289),
               "VBPR": (0.413, 0.293), "LightGCN": (0.417, 0.294)}
COLD_FRACTION = 0.1
ONE_NET = "full (one net)"  # ablation row: the ensemble's members alone
#: One net per user tower kind, over the ablation seeds (the tower comparison; the full model's own tower is
#: the ONE_NET row, so only the other kinds train).
TOWER_VARIANTS = ("full-attention", "full-gru")
#: The one-modality ablations the full model is tested against (the best of them chosen on valid).
SINGLE_MODALITIES = ("id", "text", "audio")
LIGHTGCN = "lightgcn (ours, per-user embeddings)"


def cold_split(data: InteractionData, fraction: float = COLD_FRACTION, seed: int = 0
               ) -> tuple[InteractionData, np.ndarray]:
    """Hold ``fraction`` of the items (with train interactions) out of training entirely.

    Returns:
        (data whose train split has no row of a cold item, (c,) cold item ids).
    """
    rng = np.random.default_rng(seed)
    warm = np.unique(data.train[:, 1])
    cold = np.sort(rng.choice(warm, size=max(1, int(round(fraction * data.n_items))), replace=False))
    keep = ~np.isin(data.train[:, 1], cold)
    return replace(data, train=data.train[keep], _by_user={}, held_out=cold,
                   split=data.split + f"; cold items: {len(cold)} held out"), cold


def _job(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run (in a worker process): train and evaluate.

    ``spec["member"]`` marks one net of an ensemble: it trains under its own member seed and returns
    its weights (``state``) so the parent can assemble and evaluate the ensemble.
    """
    import torch

    torch.set_num_threads(spec.get("threads", 1))
    from fusionrec.fusion.train.config import get_variant, train_config
    from fusionrec.fusion.train.ensemble import member_seed
    from fusionrec.fusion.train.training import evaluate, train

    data = load_dataset(spec["dataset"])
    cold = None
    if spec.get("cold"):
        data, cold = cold_split(data)
    variant = get_variant(spec["variant"])
    cfg = train_config(variant, **spec.get("config", {}))
    seed = spec["seed"] if "member" not in spec else member_seed(spec["seed"], spec["member"], spec["members"])
    result = train(data, variant, cfg, seed=seed, progress=spec.get("progress", False),
                   desc=f"{spec['dataset']}/{spec['variant']}/seed{seed}")
    out: dict[str, Any] = {**{k: spec[k] for k in ("dataset", "variant", "seed", "member", "cold") if k in spec},
                           "train_seed": seed, "best_epoch": result.best_epoch,
                           "valid": result.valid, "test": result.test, "train_s": round(result.train_s, 1),
                           "curve": [{"epoch": c["epoch"], "valid_recall@20": c["valid_recall@20"]}
                                     for c in result.curve]}
    if "member" not in spec and cold is None:  # per-user test figures for the paired tests
        out["test"] = evaluate(result.net, data, "test", per_user=True)
    if cold is not None:  # one net's own cold figure; the parent scores the ensemble against kNN (cold_metrics)
        out["cold_items"] = evaluate(result.net, data, "test", candidates=cold)
    if "member" in spec:
        out["state"] = result.net.state_dict()
    return out


def cold_metrics(net: Any, data: InteractionData, cold: np.ndarray) -> dict[str, Any]:
    """Test interactions with the held-out ``cold`` items ranked among them, against content-only kNN."""
    from fusionrec.fusion.train.baselines import content_knn
    from fusionrec.fusion.train.training import evaluate

    return {"cold_items": evaluate(net, data, "test", candidates=cold),
            "cold_items_all_ranking": evaluate(net, data, "test"),
            "cold_knn": evaluate(content_knn(data, "text"), data, "test", candidates=cold),
            "n_cold": int(len(cold))}


def served_metrics(checkpoint: str, data: InteractionData, part: str = "test") -> dict[str, float]:
    """Score ``part`` through the serving class (``get_fusion_model("trained", ...)``), one user at a time:
    item vectors from raw modality vectors + ids, user vector from the history of served item vectors."""
    import torch

    from fusionrec.fusion.registry import get_fusion_model
    from fusionrec.fusion.train.metrics import ranking_metrics, topk_items

    model = get_fusion_model("trained", data.modality_dims(), checkpoint=checkpoint,
                             encoder_versions=data.encoder_versions)
    items = model.item_vectors([{m: data.features[m][i] for m in data.features} for i in range(data.n_items)],
                               [str(i) for i in range(data.n_items)])
    train_items, positives = data.user_items("train"), data.user_items(part)
    users = np.asarray([u for u in range(data.n_users) if len(positives[u])], dtype=np.int64)
    user_vecs = {int(u): model.user_vector(items[train_items[u]], {}) for u in users}
    table = torch.as_tensor(items)

    def score(batch: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.stack([user_vecs[int(u)] for u in batch])) @ table.T

    topk = topk_items(score, users, [train_items[u] for u in users], 20)
    return ranking_metrics(topk, [positives[u] for u in users], data.n_items, (10, 20))


def run_jobs(specs: list[dict[str, Any]], workers: int, cache: JobCache | None = None) -> list[dict[str, Any]]:
    """Run training jobs, ``workers`` at a time (one torch thread each), results in input order.

    With several workers a bar counts finished jobs (each job's own epoch bar would interleave). With a
    ``cache``, jobs it holds are not run again and each finished job is stored as soon as it ends.
    """
    done = {i: cache.get(s) for i, s in enumerate(specs)} if cache else {}
    todo = [i for i in range(len(specs)) if done.get(i) is None]
    results = {i: r for i, r in done.items() if r is not None}

    def finish(i: int, result: dict[str, Any]) -> None:
        results[i] = result
        if cache:
            cache.put(specs[i], result)

    if workers <= 1:
        for i in todo:
            finish(i, _job({**specs[i], "threads": os.cpu_count() or 1}))
        return [results[i] for i in range(len(specs))]
    from multiprocessing import get_context

    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_job, specs[i]): i for i in todo}
        with tqdm(total=len(specs), initial=len(specs) - len(todo), desc="training runs", unit="run") as bar:
            for future in as_completed(futures):
                finish(futures[future], future.result())
                bar.update()
    return [results[i] for i in range(len(specs))]


def member_specs(dataset: str, variant: str, seed: int, members: int, config: dict[str, Any]) -> list[dict[str, Any]]:
    """One training job per net of the ensemble ``variant`` trains under ``seed``."""
    return [{"dataset": dataset, "variant": variant, "seed": seed, "member": j, "members": members, "config": config}
            for j in range(members)]


def assemble(data: InteractionData, variant_name: str, config: dict[str, Any], member_runs: list[dict[str, Any]]
             ) -> nn.Module:
    """Rebuild the trained nets of ``member_runs`` (their ``state``): one net, or an EnsembleNet of several."""
    from fusionrec.fusion.train.config import get_variant, train_config
    from fusionrec.fusion.train.ensemble import EnsembleNet
    from fusionrec.fusion.train.nets import build_net

    variant = get_variant(variant_name)
    cfg = train_config(variant, **config)
    nets = []
    for run in sorted(member_runs, key=lambda r: r["member"]):
        net = build_net(variant, data, cfg)
        net.load_state_dict(run["state"])
        nets.append(net.eval())
    return nets[0] if len(nets) == 1 else EnsembleNet(nets)


def ensemble_run(data: InteractionData, variant_name: str, seed: int, members: int, config: dict[str, Any],
                 member_runs: list[dict[str, Any]], export: bool = False,
                 checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Assemble the members trained under ``seed``, evaluate valid/test, optionally write its checkpoint."""
    from fusionrec.fusion.train.config import get_variant, train_config
    from fusionrec.fusion.train.export import export_payload, save_checkpoint
    from fusionrec.fusion.train.training import evaluate

    group = [r for r in member_runs if r["variant"] == variant_name and r["seed"] == seed]
    if len(group) != members:
        raise RuntimeError(f"{variant_name} seed {seed}: {len(group)} of {members} members trained")
    net = assemble(data, variant_name, config, group)
    test = evaluate(net, data, "test", per_user=True)
    run: dict[str, Any] = {"dataset": data.name, "variant": variant_name, "seed": seed, "members": members,
                           "valid": evaluate(net, data, "valid"), "test": test, "per_user": test.pop("per_user"),
                           "member_seeds": [r["train_seed"] for r in group],
                           "train_s": round(sum(r["train_s"] for r in group), 1)}
    if export:
        variant = get_variant(variant_name)
        payload = export_payload(net, data, variant_name, variant, train_config(variant, **config), seed,
                                 {"valid": run["valid"], "test": run["test"], "members": members,
                                  "member_seeds": run["member_seeds"]})
        run["checkpoint"] = str(save_checkpoint(payload, checkpoint_dir))
    return run


def _mean_std(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = [k for k in METRIC_KEYS if k in runs[0]]
    return ({k: float(np.mean([r[k] for r in runs])) for k in keys},
            {k: float(np.std([r[k] for r in runs])) for k in keys})


def evaluate_dataset(dataset: str, seeds: tuple[int, ...] = (0, 1, 2), ablation_seeds: tuple[int, ...] = (0, 1, 2),
                     workers: int = 2, cold: bool = True, out_dir: Path | None = None,
                     config: dict[str, Any] | None = None, members: int | None = None, resume: bool = True
                     ) -> dict[str, Any]:
    """The full protocol on one dataset; writes <out_dir>/<dataset>.{json,md,png} and returns the report.

    With ``resume`` each finished training job is kept under ``$FUSIONREC_HOME/cache/quality-jobs`` (keyed by
    its spec and the training code): an interrupted run, rerun, trains only what is missing.

    The full model is an ensemble of ``members`` nets per seed (default: the variant's); the ablations, the
    tower variants, LightGCN and the cold-item run train one net each, and "full (one net)" is the members'
    mean. The full model is tested (paired, over test users) against its best single modality and best peer.
    """
    from fusionrec.fusion.train.config import get_variant

    start = time.perf_counter()
    data = load_dataset(dataset)  # builds the text cache once, before workers start
    config = dict(config or {})
    ablations = ablation_variants(data)
    members = members or get_variant("full").members
    results = run_jobs(protocol_specs(dataset, seeds, ablation_seeds, ablations, members, config, cold), workers,
                       JobCache(home("cache", "quality-jobs")) if resume else None)
    member_runs = [r for r in results if "member" in r and not r.get("cold")]
    full_runs = [ensemble_run(data, "full", s, members, config, member_runs, export=s == seeds[0]) for s in seeds]
    cold_members = [r for r in results if r.get("cold")]
    cold_run = _cold_run(data, config, cold_members) if cold_members else None
    for r in member_runs + cold_members:
        r.pop("state", None)
    peers = _peers(data, results)
    report = _report(data, seeds, ablation_seeds, members, config, full_runs, results,
                     _ablation_table(ablations, full_runs, results, member_runs, members), _baselines(peers))
    report["significance"] = _significance(full_runs, results, peers)
    if dataset == "lfm2k":
        report["peers"] = {k: {"recall@20": r, "ndcg@20": n} for k, (r, n) in LFM2K_PEERS.items()}
    if cold_run:
        report["cold_items"] = _cold_section(cold_run, members, seeds[0])
    if report["checkpoint"]:
        report["served_check"] = _served_check(report["checkpoint"], data, full_runs, seeds[0])
    report["wall_s"] = round(time.perf_counter() - start, 1)
    write_report(report, results, Path(out_dir or reports_dir()))
    return report


def ablation_variants(data: InteractionData) -> list[str]:
    """The ablation variants ``data`` can run: each uses some modality it has (or ids); audio ones need vggish."""
    from fusionrec.fusion.train.config import get_variant, variant_modalities

    ablations = [v for v in ABLATIONS if variant_modalities(get_variant(v), data.modality_dims())
                 or get_variant(v).use_id]
    return list(dict.fromkeys(v for v in ablations if v == "full" or "audio" not in v or "vggish" in data.features))


def protocol_specs(dataset: str, seeds: tuple[int, ...], ablation_seeds: tuple[int, ...], ablations: list[str],
                   members: int, config: dict[str, Any], cold: bool) -> list[dict[str, Any]]:
    """Every training job of the protocol: the full model's members per seed, its cold-split members (seed
    ``seeds[0]``), then one net per LightGCN / ablation seed. Longest runs first so the workers finish together."""
    specs = [spec for s in seeds for spec in member_specs(dataset, "full", s, members, config)]
    if cold:  # the served model's shape (an ensemble) on the cold split
        specs += [{**spec, "cold": True} for spec in member_specs(dataset, "full", seeds[0], members, config)]
    specs += [{"dataset": dataset, "variant": "lightgcn", "seed": s, "config": config} for s in ablation_seeds]
    # A tower variant keeps its own user tower whatever ``config`` sets (config overrides every other field).
    towers = {k: v for k, v in config.items() if k != "user_tower"}
    specs += [{"dataset": dataset, "variant": v, "seed": s, "config": towers} for v in other_towers(config)
              for s in ablation_seeds]
    specs += [{"dataset": dataset, "variant": v, "seed": s, "config": config}
              for v in ablations if v != "full" for s in ablation_seeds]
    return specs


def other_towers(config: dict[str, Any]) -> list[str]:
    """The TOWER_VARIANTS whose user tower differs from the full model's (under ``config``)."""
    from fusionrec.fusion.train.config import get_variant, train_config

    own = train_config(get_variant("full"), **config).user_tower
    return [v for v in TOWER_VARIANTS if train_config(get_variant(v)).user_tower != own]


def _cold_run(data: InteractionData, config: dict[str, Any], cold_members: list[dict[str, Any]]) -> dict[str, Any]:
    """``cold_metrics`` of the ensemble of ``cold_members`` (trained on the cold split), plus their mean alone."""
    cold_data, cold_items = cold_split(data)
    run = cold_metrics(assemble(cold_data, "full", config, cold_members), cold_data, cold_items)
    run["one_net"] = _mean_std([r["cold_items"] for r in cold_members])[0]
    return run


def _ablation_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean test metrics of ``runs`` (each with "test" and "valid"), their stds, mean valid Recall@20, count."""
    mean, std = _mean_std([r["test"] for r in runs])
    return {**mean, "std": std, "std_recall@20": std["recall@20"], "seeds": len(runs),
            "valid_recall@20": float(np.mean([r["valid"]["recall@20"] for r in runs]))}


def _single_runs(results: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
    """The one-net runs of ``variant`` on the full data (not ensemble members, not the cold split)."""
    return [r for r in results if r["variant"] == variant and "member" not in r and not r.get("cold")]


def _ablation_table(ablations: list[str], full_runs: list[dict[str, Any]], results: list[dict[str, Any]],
                    member_runs: list[dict[str, Any]], members: int) -> dict[str, Any]:
    """Variant -> ``_ablation_row`` of its runs ("full" = the ensembles), ONE_NET (the members alone), then the
    one-net tower variants."""
    ablation = {v: _ablation_row(full_runs if v == "full" else _single_runs(results, v)) for v in ablations}
    if members > 1:
        ablation[ONE_NET] = _ablation_row(member_runs)  # the full model's own user tower
    ablation.update({v: _ablation_row(_single_runs(results, v)) for v in TOWER_VARIANTS
                     if _single_runs(results, v)})
    return ablation


def _peers(data: InteractionData, results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Peer name -> its runs (valid, test with per-user figures): LightGCN's seeds, MostPop and text ItemKNN."""
    from fusionrec.fusion.train.baselines import content_knn, most_popular
    from fusionrec.fusion.train.training import evaluate

    peers = {LIGHTGCN: _single_runs(results, "lightgcn")}
    for name, net in (("mostpop", most_popular(data)), ("itemknn-text", content_knn(data, "text"))):
        peers[name] = [{"valid": evaluate(net, data, "valid"), "test": evaluate(net, data, "test", per_user=True)}]
    return peers


def _baselines(peers: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Peer -> mean test metrics over its runs, with stds, mean valid Recall@20 and the number of runs."""
    return {name: _ablation_row(runs) for name, runs in peers.items() if runs}


def _significance(full_runs: list[dict[str, Any]], results: list[dict[str, Any]],
                  peers: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Paired tests over test users of the full model against its best single modality and its best peer,
    each chosen by mean valid Recall@20 (never by test)."""
    from fusionrec.fusion.train.significance import compare

    def valid(runs: list[dict[str, Any]]) -> float:
        return float(np.mean([r["valid"]["recall@20"] for r in runs])) if runs else -1.0

    singles = {v: _single_runs(results, v) for v in SINGLE_MODALITIES if _single_runs(results, v)}
    out: dict[str, Any] = {}
    for key, pool in (("vs_best_single_modality", singles), ("vs_best_peer", {k: v for k, v in peers.items() if v})):
        if pool:
            best = max(pool, key=lambda name: valid(pool[name]))
            out[key] = compare([r["per_user"] for r in full_runs], [r["test"]["per_user"] for r in pool[best]],
                               "full", best)
    return out


def _report(data: InteractionData, seeds: tuple[int, ...], ablation_seeds: tuple[int, ...], members: int,
            config: dict[str, Any], full_runs: list[dict[str, Any]], results: list[dict[str, Any]],
            ablation: dict[str, Any], baselines: dict[str, Any]) -> dict[str, Any]:
    """The report body: full model (mean ± std over seeds), ablation, baselines, runs, checkpoint."""
    from fusionrec.fusion.train.config import get_variant, train_config, variant_modalities

    tower = train_config(get_variant("full"), **config).user_tower
    test_mean, test_std = _mean_std([r["test"] for r in full_runs])
    valid_mean, _ = _mean_std([r["valid"] for r in full_runs])
    return {
        "dataset": data.name, "split": data.split,
        "protocol": "full ranking over all items, the user's train items excluded; user vector = user tower "
                    "over the train history (as served); test metrics at the epoch with best valid Recall@20; "
                    f"mean ± std over seeds {list(seeds)}",
        "model": f"full: ensemble of {members} nets ({tower} user tower; gated blocks: id + "
                 f"{' + '.join(variant_modalities(get_variant('full'), data.modality_dims()))}; item-item graph "
                 "frozen into item vectors), scored by the mean of their cosines",
        "members": members,
        "test": {**test_mean, "std": test_std, "seeds": list(seeds)},
        "valid": valid_mean,
        "ablation": ablation, "ablation_seeds": list(ablation_seeds),
        "baselines": baselines,
        "runs": [{k: r[k] for k in ("variant", "seed", "member", "train_seed", "best_epoch", "train_s") if k in r}
                 | {"test_recall@20": r["test"]["recall@20"], "checkpoint": r.get("checkpoint")}
                 for r in full_runs + results],
        "checkpoint": next((r["checkpoint"] for r in full_runs if r.get("checkpoint")), None),
        "config": config,
    }


def _cold_section(cold_run: dict[str, Any], members: int, seed: int) -> dict[str, Any]:
    """The report's cold-item figures: the ensemble, one net, content kNN, and how they were measured."""
    return {
        "recall@20": cold_run["cold_items"]["recall@20"], "ndcg@20": cold_run["cold_items"]["ndcg@20"],
        "one_net_recall@20": cold_run["one_net"]["recall@20"], "one_net_ndcg@20": cold_run["one_net"]["ndcg@20"],
        "content_knn_recall@20": cold_run["cold_knn"]["recall@20"],
        "content_knn_ndcg@20": cold_run["cold_knn"]["ndcg@20"],
        "all_items_recall@20_with_cold_held_out": cold_run["cold_items_all_ranking"]["recall@20"],
        "n_cold_items": cold_run["n_cold"], "users": cold_run["cold_items"]["users"],
        "protocol": f"{COLD_FRACTION:.0%} of items held out of training entirely (no id, no graph edge, no "
                    "negative, no centring mean); as served for unknown ids, each gets its content blocks "
                    "blended with its nearest known items by text (fusionrec.fusion.cold); the served model's shape "
                    f"({members}-net ensemble, seed {seed}); test interactions with them ranked among "
                    "the cold items, user's train items excluded; kNN = content-only ItemKNN on text",
    }


def _served_check(checkpoint: str, data: InteractionData, full_runs: list[dict[str, Any]], seed: int
                  ) -> dict[str, Any]:
    """Seed ``seed``'s checkpoint scored through the serving class next to what training evaluated."""
    served = served_metrics(checkpoint, data)
    evaluated = next(r for r in full_runs if r["seed"] == seed)["test"]
    return {"checkpoint": checkpoint, "seed": seed,
            "served_recall@20": served["recall@20"], "served_ndcg@20": served["ndcg@20"],
            "evaluated_recall@20": evaluated["recall@20"], "evaluated_ndcg@20": evaluated["ndcg@20"]}
