"""Which items one training batch scores: the whole catalog when it is small, else the batch's own items plus
a uniform sample of negatives shared by the batch (sampled softmax), so a batch costs O(batch + sample)."""

from __future__ import annotations

import numpy as np


def batch_candidates(seen: np.ndarray, targets: list[np.ndarray], catalog_ids: np.ndarray, n_items: int,
                     negatives: int, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted item ids a batch scores, or None for every item.

    Args:
        seen: history item ids the batch's user towers read; targets: per user, the items to predict.
        catalog_ids: items that may be negatives (held-out items never are).
        negatives: a catalog of at most this many items is scored whole (exact softmax); otherwise this
            many catalog items are drawn uniformly (with replacement, then deduplicated).
    """
    if n_items <= negatives:
        return None
    drawn = catalog_ids[rng.integers(len(catalog_ids), size=negatives)]
    return np.unique(np.concatenate([seen.astype(np.int64), *[t.astype(np.int64) for t in targets], drawn]))


def target_entries(targets: list[np.ndarray], candidates: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The multinomial target of each row: its distinct target items, each weighted 1 / len(targets[row]).

    Returns:
        rows, columns of the scored table (item ids, or positions in ``candidates``), float32 weights.
    """
    rows, cols, weights = [], [], []
    for r, tgt in enumerate(targets):
        items = np.unique(tgt)
        rows.append(np.full(len(items), r))
        cols.append(items)
        weights.append(np.full(len(items), 1.0 / max(len(tgt), 1), dtype=np.float32))
    cols_all = np.concatenate(cols).astype(np.int64) if cols else np.zeros(0, np.int64)
    if candidates is not None:
        cols_all = np.searchsorted(candidates, cols_all)
    return (np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64), cols_all,
            np.concatenate(weights) if weights else np.zeros(0, np.float32))


def length_groups(lengths: np.ndarray, ratio: float = 2.0, floor: int = 8) -> list[slice]:
    """Split ascending history ``lengths`` into runs padded together: a run ends where a length exceeds
    ``ratio`` x its first (and ``floor``), so one long history never pads a whole batch to its length."""
    groups, start = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] > max(floor, ratio * lengths[start]):
            groups.append(slice(start, i))
            start = i
    return groups
