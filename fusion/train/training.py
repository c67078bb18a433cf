"""The one training loop and evaluator shared by every variant (fixed seeds, early stopping on valid Recall@20)."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fusionrec.fusion.towers import MAX_HISTORY
from fusionrec.fusion.train.config import TrainConfig, VariantConfig
from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.metrics import ranking_metrics, topk_items
from fusionrec.fusion.train.nets import build_net

SELECT_METRIC = "recall@20"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pad_histories(histories: list[np.ndarray], max_len: int = MAX_HISTORY) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align (newest last) per-user item ids.

    Returns:
        ids (b, h) int64 (0 where padded), mask (b, h) bool.
    """
    h = max(1, min(max_len, max((len(x) for x in histories), default=1)))
    ids = torch.zeros(len(histories), h, dtype=torch.long)
    mask = torch.zeros(len(histories), h, dtype=torch.bool)
    for r, x in enumerate(histories):
        x = x[-h:]
        if len(x):
            ids[r, h - len(x):] = torch.as_tensor(x)
            mask[r, h - len(x):] = True
    return ids, mask


def split_history(items: np.ndarray, keep_prob: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random (input, target) split of one user's train items, order kept, both non-empty when possible."""
    if len(items) < 2:
        return items[:0], items
    keep = rng.random(len(items)) < keep_prob
    if keep.all():
        keep[rng.integers(len(items))] = False
    if not keep.any():
        keep[rng.integers(len(items))] = True
    return items[keep], items[~keep]


@dataclass
class TrainResult:
    """Best-on-valid state and the curves, for checkpoints and reports."""

    net: nn.Module
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)
    train_s: float = 0.0


@torch.no_grad()
def evaluate(net: nn.Module, data: InteractionData, part: str, ks: tuple[int, ...] = (10, 20),
             candidates: np.ndarray | None = None) -> dict[str, float]:
    """Full ranking on ``part`` ("valid"/"test"): user vectors from the train history, train items excluded.

    Args:
        candidates: restrict ranking (and positives) to these item ids (the cold-item protocol).
    """
    net.eval()
    train_items = data.user_items("train")
    positives = data.user_items(part)
    items, _ = net.item_vectors(train=False) if hasattr(net, "item_vectors") else (None, None)
    if candidates is not None:
        cand = np.zeros(data.n_items, dtype=bool)
        cand[candidates] = True
        positives = [p[cand[p]] for p in positives]
    users = np.asarray([u for u in range(data.n_users) if len(positives[u])], dtype=np.int64)
    exclude = [train_items[u] for u in users]
    if candidates is not None:
        non_cand = np.flatnonzero(~cand)
        exclude = [np.union1d(e, non_cand) for e in exclude]

    def score(batch: np.ndarray) -> torch.Tensor:
        hist, mask = pad_histories([train_items[u] for u in batch])
        return net.scores(torch.as_tensor(batch), hist, mask, items)

    topk = topk_items(score, users, exclude, max(ks))
    n_rank = data.n_items if candidates is None else len(candidates)
    return ranking_metrics(topk, [positives[u] for u in users], n_rank, ks)


def _loss(net: nn.Module, users: np.ndarray, train_items: list[np.ndarray], cfg: TrainConfig,
          rng: np.random.Generator) -> torch.Tensor:
    """Multinomial softmax loss over all items: predict held-out train items from the rest."""
    uses_history = getattr(net, "uses_history", True)
    splits = [split_history(train_items[u], cfg.keep_prob, rng) if uses_history else (train_items[u][:0],
                                                                                        train_items[u])
              for u in users]
    hist, mask = pad_histories([s[0] for s in splits])
    items, blocks = net.item_vectors(train=True) if hasattr(net, "item_vectors") else (None, None)
    logits = net.scores(torch.as_tensor(users), hist, mask, items)  # (b, n_items)
    # Input items are never candidates at serving time (seen items are excluded): mask them here too.
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[torch.nonzero(mask, as_tuple=True)[0], hist[mask]] = True
    logits = logits.masked_fill(seen, -torch.inf)
    catalog = getattr(net, "catalog", None)
    if catalog is not None and not bool(catalog.all()):  # items held out of training are not negatives either
        logits = logits.masked_fill(~catalog, -torch.inf)
    logp = torch.log_softmax(logits, dim=1)
    target = torch.zeros_like(logits)
    for r, (_, tgt) in enumerate(splits):
        target[r, torch.as_tensor(tgt)] = 1.0 / max(len(tgt), 1)
    loss = -(torch.nan_to_num(logp, neginf=0.0) * target).sum(1).mean()
    if blocks is not None and cfg.align_weight > 0:
        loss = loss + cfg.align_weight * net.align_loss(blocks)
    if items is not None and cfg.query_weight > 0:
        loss = loss + cfg.query_weight * net.query_loss(items)
    return loss


def train(data: InteractionData, variant: VariantConfig, cfg: TrainConfig, seed: int = 0,
          known_items: np.ndarray | None = None, progress: bool = True, desc: str = "") -> TrainResult:
    """Train one variant; keep the epoch with the best valid Recall@20; report test at that epoch."""
    set_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_net(variant, data, cfg, known_items)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_items = data.user_items("train")
    users_all = np.asarray([u for u in range(data.n_users) if len(train_items[u])], dtype=np.int64)
    best, best_state, best_epoch, stale, curve = -1.0, None, -1, 0, []
    best_valid: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=desc or variant.kind, disable=not progress, leave=False)
    for epoch in bar:
        net.train()
        perm = rng.permutation(users_all)
        total = 0.0
        for b in range(0, len(perm), cfg.batch_users):
            loss = _loss(net, perm[b:b + cfg.batch_users], train_items, cfg, rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        if (epoch + 1) % cfg.eval_every:
            continue
        valid = evaluate(net, data, "valid")
        curve.append({"epoch": epoch, "loss": total, **{f"valid_{k}": v for k, v in valid.items()}})
        if valid[SELECT_METRIC] > best:
            best, best_epoch, best_valid, stale = valid[SELECT_METRIC], epoch, valid, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            stale += 1
        bar.set_postfix(loss=f"{total:.2f}", valid_r20=f"{valid[SELECT_METRIC]:.4f}", best=f"{best:.4f}")
        if stale >= cfg.patience:
            break
    net.load_state_dict(best_state)
    test = evaluate(net, data, "test")
    return TrainResult(net, best_epoch, best_valid, test, curve, time.perf_counter() - start)
