"""The one training loop and evaluator shared by every variant (fixed seeds, early stopping on valid Recall@20)."""

from __future__ import annotations

import copy
import ctypes
import functools
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fusionrec.fusion.towers import MAX_HISTORY
from fusionrec.fusion.train.config import TrainConfig, VariantConfig
from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.metrics import per_user_metrics, ranking_metrics, topk_items
from fusionrec.fusion.train.nets import build_net
from fusionrec.fusion.train.sampling import batch_candidates, length_groups, target_entries

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
    kept = [np.asarray(x[-h:], dtype=np.int64) for x in histories]
    lengths = np.asarray([len(x) for x in kept], dtype=np.int64)
    rows = np.repeat(np.arange(len(kept)), lengths)
    cols = h - np.repeat(lengths, lengths) + (np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    ids = np.zeros((len(kept), h), dtype=np.int64)
    ids[rows, cols] = np.concatenate(kept) if len(rows) else 0
    return torch.from_numpy(ids), torch.from_numpy(np.arange(h)[None, :] >= h - lengths[:, None])


def split_history(items: np.ndarray, keep_prob: float, rng: np.random.Generator, prefix_share: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) split of one user's train items, order kept, both non-empty when possible: random, or
    with probability ``prefix_share`` chronological (input = the items before a random cut, target = the rest,
    as valid/test follow train in time)."""
    if len(items) < 2:
        return items[:0], items
    if prefix_share > 0 and rng.random() < prefix_share:
        cut = int(rng.integers(max(1, int(round(keep_prob * len(items)))), len(items)))
        return items[:cut], items[cut:]
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
             candidates: np.ndarray | None = None, users: np.ndarray | None = None, per_user: bool = False
             ) -> dict[str, Any]:
    """Full ranking on ``part`` ("valid"/"test"): user vectors from the train history, train items excluded.

    Args:
        candidates: restrict ranking (and positives) to these item ids (the cold-item protocol).
        users: rank only these users (default every user with a positive in ``part``).
        per_user: also return ``"per_user"``: {"users": (u,) ids, "recall@20": (u,), "ndcg@20": (u,)} for
            paired tests (fusionrec.fusion.train.significance).
    """
    net.eval()
    train_items = data.user_items("train")
    positives = data.user_items(part)
    items, _ = net.item_vectors(train=False) if hasattr(net, "item_vectors") else (None, None)
    if candidates is not None:
        cand = np.zeros(data.n_items, dtype=bool)
        cand[candidates] = True
        positives = [p[cand[p]] for p in positives]
    pool = range(data.n_users) if users is None else users
    users = np.asarray([u for u in pool if len(positives[u])], dtype=np.int64)
    exclude = [train_items[u] for u in users]
    if candidates is not None:
        non_cand = np.flatnonzero(~cand)
        exclude = [np.union1d(e, non_cand) for e in exclude]

    def score(batch: np.ndarray) -> torch.Tensor:
        hist, mask = pad_histories([train_items[u] for u in batch])
        return net.scores(torch.as_tensor(batch), hist, mask, items)

    # Score blocks of ~16M entries: a large catalog ranks fewer users at a time.
    topk = topk_items(score, users, exclude, max(ks), batch_size=max(1, min(1024, (1 << 24) // data.n_items)))
    n_rank = data.n_items if candidates is None else len(candidates)
    out: dict[str, Any] = ranking_metrics(topk, [positives[u] for u in users], n_rank, ks)
    if per_user:
        values = per_user_metrics(topk, [positives[u] for u in users], (20,))
        out["per_user"] = {"users": users, "recall@20": values["recall@20"], "ndcg@20": values["ndcg@20"]}
    return out


def _loss(net: nn.Module, users: np.ndarray, train_items: list[np.ndarray], cfg: TrainConfig,
          rng: np.random.Generator, catalog_ids: np.ndarray) -> torch.Tensor:
    """Multinomial softmax loss: predict held-out train items from the rest, over every item or, in a large
    catalog, over the batch's items plus sampled negatives (fusionrec.fusion.train.sampling)."""
    uses_history = getattr(net, "uses_history", True)
    splits = [split_history(train_items[u], cfg.keep_prob, rng, cfg.prefix_share) if uses_history
              else (train_items[u][:0], train_items[u]) for u in users]
    # Rows by input length, padded in runs of similar length (right-aligned: padding changes no score).
    order = np.argsort([len(s[0]) for s in splits], kind="stable")
    users, splits = users[order], [splits[i] for i in order]
    groups = length_groups(np.asarray([min(len(s[0]), MAX_HISTORY) for s in splits]))
    padded = [pad_histories([s[0] for s in splits[g]]) for g in groups]
    targets = [s[1] for s in splits]
    seen = torch.cat([h[m] for h, m in padded]).numpy()
    cand = batch_candidates(seen, targets, catalog_ids, net.n_items, cfg.negatives, rng)
    cand_t = None if cand is None else torch.from_numpy(cand)
    local = [(h if cand_t is None else torch.searchsorted(cand_t, h), m) for h, m in padded]  # ids -> table rows
    users_t = torch.as_tensor(users)
    if hasattr(net, "batch_items"):
        items, blocks = net.batch_items(cand_t, train=True)
        logits = torch.cat([net.scores(users_t[g], h, m, items) for g, (h, m) in zip(groups, local)])
    else:
        items, blocks = None, None
        logits = torch.cat([net.scores(users_t[g], h, m, candidates=cand_t) for g, (h, m) in zip(groups, local)])
    # Input items are never candidates at serving time (seen items are excluded): mask them here too.
    seen_rows = torch.cat([torch.nonzero(m, as_tuple=True)[0] + g.start for g, (_, m) in zip(groups, local)])
    logits.index_put_((seen_rows, torch.cat([h[m] for h, m in local])), torch.tensor(-torch.inf))  # a fresh cat
    catalog = getattr(net, "catalog", None)
    if cand is None and catalog is not None and not bool(catalog.all()):  # held-out items are no negatives
        logits = logits.masked_fill(~catalog, -torch.inf)
    logp = torch.log_softmax(logits, dim=1)
    rows, cols, weights = (torch.from_numpy(a) for a in target_entries(targets, cand))
    loss = -(torch.nan_to_num(logp[rows, cols], neginf=0.0) * weights).sum() / len(users)
    if blocks is not None and cfg.align_weight > 0:
        loss = loss + cfg.align_weight * net.align_loss(blocks, ids=cand_t)
    if items is not None and cfg.query_weight > 0:
        loss = loss + cfg.query_weight * net.query_loss(items, ids=cand_t)
    return loss


def train(data: InteractionData, variant: VariantConfig, cfg: TrainConfig, seed: int = 0,
          known_items: np.ndarray | None = None, progress: bool = True, desc: str = "") -> TrainResult:
    """Train one variant; keep the epoch with the best valid Recall@20; report test at that epoch.

    An epoch is one pass over the users with train items, ``cfg.batch_users`` at a time; in a catalog larger
    than ``cfg.negatives`` each batch scores a sample (O(interactions) per epoch) and the graph residual is
    refreshed once per epoch. Each curve entry records the epoch's training and evaluation seconds.
    """
    set_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_net(variant, data, cfg, known_items)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_items = data.user_items("train")
    users_all = np.asarray([u for u in range(data.n_users) if len(train_items[u])], dtype=np.int64)
    catalog = getattr(net, "catalog", None)
    catalog_ids = np.arange(data.n_items) if catalog is None else catalog.nonzero().squeeze(1).numpy()
    eval_users = eval_sample(data, cfg.eval_users, seed)
    best, best_state, best_epoch, stale, curve = -1.0, None, -1, 0, []
    best_valid: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=desc or variant.kind, disable=not progress, leave=False)
    for epoch in bar:
        epoch_start = time.perf_counter()
        total = _epoch(net, opt, rng.permutation(users_all), train_items, cfg, rng, catalog_ids,
                       progress and f"epoch {epoch}")
        train_s = time.perf_counter() - epoch_start
        if (epoch + 1) % cfg.eval_every:
            continue
        valid = evaluate(net, data, "valid", users=eval_users)
        curve.append({"epoch": epoch, "loss": total, "train_s": train_s,
                      "eval_s": time.perf_counter() - epoch_start - train_s,
                      **{f"valid_{k}": v for k, v in valid.items()}})
        if valid[SELECT_METRIC] > best:
            best, best_epoch, best_valid, stale = valid[SELECT_METRIC], epoch, valid, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            stale += 1
        bar.set_postfix(loss=f"{total:.2f}", valid_r20=f"{valid[SELECT_METRIC]:.4f}", best=f"{best:.4f}")
        if stale >= cfg.patience:
            break
    net.load_state_dict(best_state)
    test = evaluate(net, data, "test", users=eval_users)
    return TrainResult(net, best_epoch, best_valid, test, curve, time.perf_counter() - start)


def _epoch(net: nn.Module, opt: torch.optim.Optimizer, perm: np.ndarray, train_items: list[np.ndarray],
           cfg: TrainConfig, rng: np.random.Generator, catalog_ids: np.ndarray, progress: str | bool) -> float:
    """One pass over the users ``perm``, ``cfg.batch_users`` at a time; returns the summed batch losses.

    A catalog larger than ``cfg.negatives`` is sampled per batch: the graph residual is refreshed first, and
    the heap is trimmed after each batch.
    """
    sampled = net.n_items > cfg.negatives
    net.train()
    if sampled and hasattr(net, "refresh"):
        net.refresh()
    total = 0.0
    for b in tqdm(range(0, len(perm), cfg.batch_users), desc=progress or "", unit="batch", leave=False,
                  disable=not progress or len(perm) < 16 * cfg.batch_users):
        loss = _loss(net, perm[b:b + cfg.batch_users], train_items, cfg, rng, catalog_ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
        if sampled:
            _release_heap()
    return total


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_heap() -> None:
    """Hand freed heap pages back to the OS (glibc). Batches over a sampled large catalog allocate buffers of
    varying sizes; without this the allocator kept ~1 GiB more resident per epoch at 100k items (measured)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def eval_sample(data: InteractionData, n: int, seed: int) -> np.ndarray | None:
    """``n`` users drawn once per run (own generator: the training stream is untouched); None = every user."""
    if n <= 0 or n >= data.n_users:
        return None
    return np.sort(np.random.default_rng(seed + 7919).choice(data.n_users, size=n, replace=False))
