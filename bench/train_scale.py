"""`fusionrec bench train`: the trained fusion model at catalog scale, on synthetic data (no service needed).

A clustered catalog with modality vectors shaped like the platform's encoders (text 384-d MiniLM, image
1280-d EfficientNet-Lite0, audio 174-d librosa; unit rows), users with power-law activity who prefer one to
three clusters and, within them, items by a Zipf-like appeal only behaviour reveals. One net of the full model
over every modality (id + text + image + audio, item graph) trains a few epochs; the result gives seconds per
epoch, graph build seconds, peak RSS and Recall@20 against MostPop -> bench/results/train_scale.json.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: Modality -> dim, as the platform's encoders produce them (encoders/).
DIMS = {"text": 384, "image": 1280, "audio": 174}
#: Noise around a cluster's centre, per modality (text separates clusters best, audio worst).
NOISE = {"text": 1.0, "image": 1.5, "audio": 2.0}
#: Share of a user's interactions inside their preferred clusters.
IN_TASTE = 0.85
MEAN_EVENTS_PER_USER = 20


def _features(cluster: np.ndarray, n_clusters: int, rng: np.random.Generator, dims: dict[str, int],
              chunk: int = 16384) -> dict[str, np.ndarray]:
    """Per modality (n, d) float32 unit rows: the item's cluster centre plus noise (image features are
    non-negative, as pooled CNN activations are)."""
    out = {}
    for m, d in dims.items():
        centres = rng.standard_normal((n_clusters, d), dtype=np.float32)
        x = np.empty((len(cluster), d), dtype=np.float32)
        for a in range(0, len(cluster), chunk):  # chunks: no (n, d) float64 temporaries
            rows = cluster[a:a + chunk]
            block = centres[rows] + NOISE.get(m, 1.0) * rng.standard_normal((len(rows), d), dtype=np.float32)
            x[a:a + chunk] = np.logaddexp(0, block) if m == "image" else block
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[m] = x
    return out


def _events(n_users: int, n_items: int, cluster: np.ndarray, n_clusters: int, total: int,
            rng: np.random.Generator) -> np.ndarray:
    """(n, 2) distinct (user, item) rows, about ``total`` of them, in a random order per user."""
    activity = rng.pareto(1.5, n_users) + 1.0  # power-law activity
    counts = np.clip(np.round(activity / activity.sum() * total * 1.2), 3, max(3, min(2000, n_items // 20)))
    users = np.repeat(np.arange(n_users), counts.astype(np.int64))
    appeal = 1.0 / (rng.permutation(n_items) % max(1, n_items // n_clusters) + 5.0)  # Zipf-like within a cluster
    order = np.lexsort((rng.random(n_items), cluster))  # items grouped by cluster
    within = np.zeros(n_items)
    for c, idx in enumerate(np.split(order, np.searchsorted(cluster[order], np.arange(1, n_clusters)))):
        within[idx] = np.cumsum(appeal[idx]) / appeal[idx].sum()
    keys = cluster[order] + within[order]  # increasing: cluster c's items cover (c, c + 1]
    taste = rng.integers(n_clusters, size=(n_users, 3))
    width = rng.integers(1, 4, size=n_users)
    pick = taste[users, (rng.random(len(users)) * width[users]).astype(np.int64)]
    in_taste = rng.random(len(users)) < IN_TASTE
    c = np.where(in_taste, pick, rng.integers(n_clusters, size=len(users)))
    items = order[np.minimum(np.searchsorted(keys, c + rng.random(len(users))), n_items - 1)]
    rows = np.unique(users * n_items + items)  # distinct pairs
    rows = rng.permutation(rows)[:total]
    return np.stack([rows // n_items, rows % n_items], axis=1).astype(np.int64)


def synthetic_catalog(n_items: int, n_interactions: int, seed: int = 0, dims: dict[str, int] | None = None) -> Any:
    """An InteractionData of ``n_items`` items and ``n_interactions`` interactions (see module doc; ``dims``:
    modality -> dim, default the encoders' ``DIMS``): each user's last event is test and the one before it
    valid (users with 3 or more)."""
    dims = dims or DIMS
    from fusionrec.fusion.train.data import InteractionData

    rng = np.random.default_rng(seed)
    n_clusters = max(8, n_items // 1000)
    n_users = max(50, n_interactions // MEAN_EVENTS_PER_USER)
    cluster = rng.integers(n_clusters, size=n_items)
    rows = _events(n_users, n_items, cluster, n_clusters, n_interactions, rng)
    rows = rows[np.lexsort((rng.random(len(rows)), rows[:, 0]))]  # by user, random time order
    count = np.bincount(rows[:, 0], minlength=n_users)
    start = np.r_[0, np.cumsum(count)[:-1]]
    rank = np.arange(len(rows)) - start[rows[:, 0]]
    last = count[rows[:, 0]] - 1
    long = count[rows[:, 0]] >= 3
    test, valid = long & (rank == last), long & (rank == last - 1)
    return InteractionData(
        name="synthetic", n_users=n_users, n_items=n_items, train=rows[~(test | valid)], valid=rows[valid],
        test=rows[test], features=_features(cluster, n_clusters, rng, dims),
        encoder_versions={m: f"{m}@synthetic" for m in dims},
        split="per user: last event test, the one before valid (users with 3+ events)")


def peak_rss_gib() -> float:
    """Peak resident memory of this process plus its waited-for children (getrusage maxrss, KiB on Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + children) / 2 ** 20, 3)


def _export_and_load(net: Any, data: Any, variant: Any, cfg: Any) -> dict[str, float]:
    """Write the checkpoint a replica would load, load it with TrainedFusion, fuse a few items: sizes and times."""
    from fusionrec.fusion.train.export import export_payload, save_checkpoint
    from fusionrec.fusion.trained import TrainedFusion

    with tempfile.TemporaryDirectory(prefix="fusionrec-train-scale-") as tmp:
        start = time.perf_counter()
        path = save_checkpoint(export_payload(net, data, "bench-full", variant, cfg, 0, {}), Path(tmp))
        export_s = time.perf_counter() - start
        model = TrainedFusion(DIMS, str(path), data.encoder_versions)
        load_s = time.perf_counter() - start - export_s
        ids = [0, 1, data.n_items - 1]
        model.item_vectors([{m: data.features[m][i] for m in DIMS} for i in ids], [str(i) for i in ids])
        model.item_vectors([{m: data.features[m][0] for m in DIMS}], ["never-seen"])  # cold-start path
        return {"checkpoint_mb": round(path.stat().st_size / 2 ** 20, 1), "export_s": round(export_s, 2),
                "load_s": round(load_s, 2)}


def run_train_scale(n_items: int, n_interactions: int, out_dir: Path, epochs: int = 2, batch_users: int = 1024,
                    negatives: int = 4096, eval_users: int = 2000, threads: int = 0, export: bool = True,
                    seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate, train ``epochs`` epochs, optionally export + load; write ``out_dir/train_scale.json``."""
    import faiss
    import torch

    from fusionrec.fusion.train.baselines import most_popular
    from fusionrec.fusion.train.config import TrainConfig, VariantConfig
    from fusionrec.fusion.train.training import eval_sample, evaluate, train

    if threads > 0:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    data = synthetic_catalog(n_items, n_interactions, seed)
    data_s = time.perf_counter() - start
    n_events = len(data.train) + len(data.valid) + len(data.test)
    log(f"synthetic catalog: {n_items} items, {data.n_users} users, {n_events} interactions ({data_s:.1f} s)")
    variant = VariantConfig(groups=tuple(DIMS), use_id=True, graph=True)
    cfg = TrainConfig(epochs=epochs, patience=epochs, batch_users=batch_users, negatives=negatives,
                      eval_users=eval_users)
    result = train(data, variant, cfg, seed=seed, progress=True, desc=f"train {n_items} items")
    epochs_out = [{"epoch": c["epoch"], "train_s": round(c["train_s"], 2), "eval_s": round(c["eval_s"], 2),
                   "valid_recall@20": round(c["valid_recall@20"], 4)} for c in result.curve]
    mostpop = evaluate(most_popular(data), data, "valid", users=eval_sample(data, eval_users, seed))
    out: dict[str, Any] = {
        "items": n_items, "interactions": n_events, "users": data.n_users, "train_interactions": len(data.train),
        "modality_dims": DIMS, "seconds_per_epoch": round(float(np.mean([e["train_s"] for e in epochs_out])), 2),
        "epochs": epochs_out, "graph_build_s": round(result.net.build_timings["graph_s"], 2),
        "cold_start_s": round(result.net.build_timings["cold_start_s"], 2), "data_s": round(data_s, 2),
        "graph_nnz": int(result.net.graph._nnz()),
        "graph_entries_per_item": round(result.net.graph._nnz() / n_items, 1),
        "valid_recall@20": round(result.valid["recall@20"], 4), "test_recall@20": round(result.test["recall@20"], 4),
        "mostpop_valid_recall@20": round(mostpop["recall@20"], 4), "eval_users": eval_users,
        "config": {"batch_users": batch_users, "negatives": negatives, "threads": threads or torch.get_num_threads(),
                   "epochs": epochs, "seed": seed},
        "peak_rss_gib_training": peak_rss_gib(),
    }
    if export:
        out["export"] = _export_and_load(result.net, data, variant, cfg)
    out["peak_rss_gib"] = peak_rss_gib()
    out["host"] = {"cpus": os.cpu_count(), "load_avg_1m_before": round(load_before[0], 2),
                   "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    out["wall_s"] = round(time.perf_counter() - start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_scale.json").write_text(json.dumps(out, indent=2))
    return out
