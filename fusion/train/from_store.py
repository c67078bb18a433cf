"""Train the fusion model on what the service stores (`fusionrec train --from-store`), Ray-free.

A snapshot of the store (``RetrievalEngine.training_snapshot``: every item's per-modality vectors
and every recorded interaction) becomes an InteractionData with a leave-latest-out split: each
user's latest interaction(s) with items new to them (replays fold into the first time) are the hold-out, the one before them the validation event early
stopping reads; users with too few interactions keep every event in train. One net of a variant
widened to every stored modality trains on the rest. The candidate and the served model are then
scored alike through their serving class (``FusionModel.item_vectors`` / ``user_vector`` over the
non-held-out history, exactly the served path), and the report says whether the candidate wins.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fusionrec.fusion.base import FusionModel
from fusionrec.fusion.train.config import TrainConfig, VariantConfig, get_variant, train_config
from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.metrics import ranking_metrics, topk_items

DATASET = "store"
#: Latest interactions per user held out for the comparison.
HOLDOUT = 1
#: A user's events stay all in train unless at least this many remain in train after the hold-out.
MIN_TRAIN = 2
#: Variants that mean "every content modality": widened to every stored one (images, precomputed too).
ALL_CONTENT = ("full", "full-nograph", "content")
#: The default variant on the store: content only (every stored modality), no id table. On the demo catalog
#: ids overfit: with 40 users one "full" net scored Recall@20 0.39-0.45 on the hold-out, "content" 0.45-0.58;
#: with 200 users "full-nograph" 0.625-0.65, "content" 0.69-0.705, weighted-v0 0.64 (seeds 0-2).
STORE_VARIANT = "content"
#: Fast enough for the demo catalog (4-10 s on 2 cores, 200 users), one net. query_weight trains the
#: query path (FusionNet.query_loss), so a text-only query also scores by image and audio: on the demo
#: catalog it moved the non-text share of a text query's top-10 contributions from 0 to 0.45, hold-out
#: Recall@20 0.705 / 0.690 / 0.695 -> 0.705 / 0.700 / 0.710 (seeds 0-2).
STORE_TRAIN = {"epochs": 60, "patience": 15, "batch_users": 16, "weight_decay": 1e-4, "query_weight": 0.5}
#: Better = higher hold-out Recall@20, ties broken by NDCG@20 (a small catalog often ranks every
#: held-out item into both models' top 20).
COMPARE_METRIC = "recall@20"
TIE_BREAK_METRIC = "ndcg@20"


def leave_latest_out(histories: list[np.ndarray], holdout: int = HOLDOUT, min_train: int = MIN_TRAIN
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split per-user item histories (oldest first) into (user, item) train / valid / test rows.

    A user with at least ``min_train + holdout`` events gives its latest ``holdout`` to test; with
    one more, the event before them goes to valid (early stopping). Held-out items the user already
    has in an earlier split are dropped from it: serving never recommends a seen item.

    Returns:
        train, valid, test: (n, 2) int64, oldest first per user.
    """
    parts: list[list[tuple[int, int]]] = [[], [], []]
    for u, items in enumerate(histories):
        n = len(items)
        cut_test = n - holdout if n >= min_train + holdout else n
        cut_valid = cut_test - 1 if cut_test < n and cut_test - 1 >= min_train else cut_test
        train, valid, test = items[:cut_valid], items[cut_valid:cut_test], items[cut_test:]
        valid = [i for i in valid if i not in set(train)]
        test = [i for i in test if i not in set(train) | set(valid)]
        for k, chunk in enumerate((train, valid, test)):
            parts[k].extend((u, int(i)) for i in chunk)
    return tuple(np.asarray(p, dtype=np.int64).reshape(-1, 2) for p in parts)  # type: ignore[return-value]


def snapshot_data(snapshot: dict[str, Any], holdout: int = HOLDOUT, min_train: int = MIN_TRAIN) -> InteractionData:
    """A store snapshot -> InteractionData (rows = ``snapshot["item_ids"]`` order, users sorted by id).

    Args:
        snapshot: ``item_ids`` (n,); ``vectors`` modality -> (n, d) float32; ``present`` modality -> (n,)
            bool; ``events`` (user_id, item_id, timestamp_s) tuples; ``encoder_versions``.
    Modalities no item has are left out; an item's missing modality row holds that modality's mean
    (``present`` says it is absent, so the net masks it as serving does).
    """
    item_ids = list(snapshot["item_ids"])
    row = {item_id: r for r, item_id in enumerate(item_ids)}
    events = sorted((e for e in snapshot["events"] if e[1] in row), key=lambda e: (e[0], float(e[2])))
    users = sorted({e[0] for e in events})
    col = {user: u for u, user in enumerate(users)}
    histories: list[list[int]] = [[] for _ in users]
    for user, item_id, _ts in events:
        histories[col[user]].append(row[item_id])
    # A replay is never a target (serving leaves seen items out): the latest item new to the user is held out.
    histories = [list(dict.fromkeys(h)) for h in histories]
    train, valid, test = leave_latest_out([np.asarray(h, dtype=np.int64) for h in histories], holdout, min_train)
    features, present = {}, {}
    for m, x in snapshot["vectors"].items():
        mask = np.array(snapshot["present"][m], dtype=bool)  # a writable copy (Ray hands read-only arrays)
        if not mask.any():
            continue
        x = np.asarray(x, dtype=np.float32).copy()
        x[~mask] = x[mask].mean(0)
        features[m], present[m] = x, mask
    versions = dict(snapshot.get("encoder_versions") or {})
    return InteractionData(
        name=DATASET, n_users=len(users), n_items=len(item_ids), train=train, valid=valid, test=test,
        features=features, encoder_versions={m: versions.get(m, f"{m}@precomputed") for m in features},
        split=f"leave-latest-out: each user's latest {holdout} interaction(s) (replays folded into the first) held out (the one before them "
              f"validates); users with fewer than {min_train + holdout} keep all in train",
        item_names=item_ids, present=present)


def store_variant(name: str, modalities: list[str], members: int = 1) -> VariantConfig:
    """Variant ``name`` for the store: ALL_CONTENT variants use every stored modality; ``members`` nets."""
    variant = get_variant(name)
    groups = tuple(modalities) if name in ALL_CONTENT else variant.groups
    return replace(variant, groups=groups, members=members)


def evaluate_model(model: FusionModel, data: InteractionData, part: str = "test", ks: tuple[int, ...] = (10, 20)
                   ) -> dict[str, float]:
    """Rank every item for each user with a ``part`` positive, as served: item vectors from the items'
    modality vectors and ids, user vector from the history before ``part`` (train, plus valid for
    test), that history excluded. Any FusionModel (weighted-v0, trained, ...)."""
    import torch

    present = data.present or {}
    items = [{m: data.features[m][i] for m in data.features if present.get(m, np.ones(data.n_items, bool))[i]
              and m in model.modality_dims} for i in range(data.n_items)]
    vectors = model.item_vectors(items, list(data.item_names) or None)
    histories = _histories(data, part)
    positives = data.user_items(part)
    users = np.asarray([u for u in range(data.n_users) if len(positives[u]) and len(histories[u])], dtype=np.int64)
    user_vecs = {int(u): model.user_vector(vectors[histories[u]], {}) for u in users}
    table = torch.as_tensor(vectors)

    def score(batch: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.stack([user_vecs[int(u)] for u in batch])) @ table.T

    topk = topk_items(score, users, [histories[u] for u in users], min(max(ks), data.n_items))
    return ranking_metrics(topk, [positives[u] for u in users], data.n_items, ks)


def _histories(data: InteractionData, part: str) -> list[np.ndarray]:
    """Per user, the items before ``part`` in time order (train, then valid when scoring test)."""
    train = data.user_items("train")
    if part != "test":
        return train
    valid = data.user_items("valid")
    return [np.concatenate([t, v]) for t, v in zip(train, valid)]


def train_candidate(data: InteractionData, variant_name: str = STORE_VARIANT, seed: int = 0, members: int = 1,
                    progress: bool = False, **config: Any) -> tuple[Any, VariantConfig, TrainConfig, list[Any]]:
    """Train ``members`` nets of ``store_variant(variant_name)`` on ``data`` (early stopping on valid).

    Returns:
        (the net or an EnsembleNet, the variant, its TrainConfig, the TrainResults).
    """
    from fusionrec.fusion.train.ensemble import EnsembleNet, member_seed
    from fusionrec.fusion.train.training import train

    variant = store_variant(variant_name, list(data.features), members)
    if variant.kind != "fusion":
        raise ValueError(f"{variant_name} is an offline baseline (per-user embeddings): it cannot be served")
    cfg = train_config(variant, **{**STORE_TRAIN, **config})
    results = [train(data, variant, cfg, seed=member_seed(seed, j, members), progress=progress,
                     desc=f"{DATASET}/{variant_name}/net{j}") for j in range(members)]
    net = results[0].net if members == 1 else EnsembleNet([r.net for r in results])
    return net, variant, cfg, results


def export_candidate(net: Any, data: InteractionData, variant_name: str, variant: VariantConfig, cfg: TrainConfig,
                     seed: int, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> Path:
    """Write the candidate's checkpoint keyed by the store's item ids (absolute path; default home/checkpoints)."""
    from fusionrec.fusion.train.export import export_payload, save_checkpoint

    payload = export_payload(net, data, variant_name, variant, cfg, seed, metrics)
    payload["item_ids"] = [data.item_names[int(i)] for i in payload["item_ids"]]  # dataset rows -> store ids
    return save_checkpoint(payload, checkpoint_dir).resolve()


def train_from_snapshot(snapshot: dict[str, Any], served: FusionModel | None, *, variant: str = STORE_VARIANT,
                        seed: int = 0, members: int = 1, min_gain: float = 0.0, checkpoint_dir: Path | None = None,
                        echo: Callable[[str], None] = lambda _line: None, **config: Any) -> dict[str, Any]:
    """Snapshot -> hold-out split -> candidate checkpoint -> both models scored on the hold-out.

    Args:
        served: the model serving now (what the store is indexed with); None = nothing to beat.
        min_gain: the candidate is ``better`` only when its hold-out Recall@20 exceeds the served
            model's by more than this.
        config: TrainConfig overrides (e.g. ``epochs``) on top of STORE_TRAIN.
    Returns:
        the report: hold-out, candidate and served metrics, checkpoint (absolute), ``better``.
    """
    from fusionrec.fusion.trained import TrainedFusion

    start = time.perf_counter()
    data = snapshot_data(snapshot)
    hold_out = {"users": int(len(np.unique(data.test[:, 0]))), "users_without_hold_out": _users_all_in_train(data),
                "events": int(len(data.test)), "split": data.split}
    echo(f"snapshot: {data.n_items} items, {data.n_users} users, {sum(map(len, (data.train, data.valid, data.test)))} "
         f"interactions, modalities {sorted(data.features)}; hold-out: {hold_out['events']} events of "
         f"{hold_out['users']} users ({hold_out['users_without_hold_out']} users without one)")
    net, spec, cfg, results = train_candidate(data, variant, seed, members, **config)
    train_s = time.perf_counter() - start
    parts = (net.members[0] if members > 1 else net).item_tower.parts
    echo(f"trained {members} net(s) of {variant} over {parts}: best epoch {[r.best_epoch for r in results]}, valid Recall@20 {results[0].valid.get('recall@20', 0):.4f} "
         f"({train_s:.1f} s)")
    path = export_candidate(net, data, variant, spec, cfg, seed, {"valid": results[0].valid}, checkpoint_dir)
    candidate = TrainedFusion(snapshot["modality_dims"], str(path), snapshot.get("encoder_versions"))
    report = {"dataset": DATASET, "variant": variant, "members": members, "seed": seed, "checkpoint": str(path),
              "hold_out": hold_out, "train_config": cfg.to_dict(), "best_epochs": [r.best_epoch for r in results],
              "candidate": {"model_version": candidate.version, **evaluate_model(candidate, data)},
              "served": None if served is None else {"model_version": served.version,
                                                     **evaluate_model(served, data)},
              "min_gain": min_gain, "compare_metric": COMPARE_METRIC, "promoted": False}
    report["better"] = served is None or is_better(report["candidate"], report["served"], min_gain)
    report["wall_s"] = round(time.perf_counter() - start, 2)
    return report


def is_better(candidate: dict[str, float], served: dict[str, float], min_gain: float = 0.0) -> bool:
    """Candidate Recall@20 above the served one's + ``min_gain``; at equal Recall@20 (and no ``min_gain``),
    a higher NDCG@20."""
    gain = candidate[COMPARE_METRIC] - served[COMPARE_METRIC]
    if abs(gain) < 1e-9 and min_gain <= 0:
        return candidate[TIE_BREAK_METRIC] > served[TIE_BREAK_METRIC] + 1e-9
    return gain > min_gain


def _users_all_in_train(data: InteractionData) -> int:
    """Users with interactions but nothing held out (too few to spare one)."""
    return int(len(set(data.train[:, 0].tolist()) - set(data.test[:, 0].tolist())))


def comparison_table(report: dict[str, Any]) -> str:
    """The hold-out figures of the candidate and the served model, one line each."""
    lines = [f"{'model':<12} {'version':<34} {'Recall@20':>9} {'NDCG@20':>8} {'users':>5}"]
    for role in ("candidate", "served"):
        row = report.get(role)
        if row:
            lines.append(f"{role:<12} {row['model_version']:<34} {row['recall@20']:>9.4f} {row['ndcg@20']:>8.4f} "
                         f"{int(row['users']):>5}")
    return "\n".join(lines)


def write_report(report: dict[str, Any]) -> Path:
    """Write ``report`` as JSON next to its checkpoint (``<checkpoint stem>.report.json``)."""
    path = Path(report["checkpoint"]).with_suffix(".report.json")
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return path
