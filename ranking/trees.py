"""A trained LightGBM tree ensemble scored in NumPy, a whole candidate list at once (QuickScorer's idea).

LightGBM walks every tree node by node for every row: about 10 µs per row for 400 trees of 7
leaves, mostly mispredicted branches, which made its ``predict`` most of the ranking stage's cost.
Here each tree's leaves are bits of a mask, in left-to-right order; a split whose test fails
(the row goes right) clears the bits of its left subtree, and the row's leaf is the lowest bit
left. The failed tests of one feature are a prefix of that feature's splits sorted by threshold,
so each (feature, prefix length) maps to one precomputed row of per-tree masks: scoring is one
``searchsorted`` per feature, one gather, one AND-reduction and a leaf-value lookup.

Same decisions as LightGBM's numerical splits (``<=``, missing types None/Zero/NaN, default
directions, values within ±1e-35 read as 0); sums are in float64, so scores match LightGBM's
within float rounding. Models this does not cover (categorical splits, several trees per
iteration, transformed outputs, more than 64 leaves) compile to None and stay with LightGBM.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: LightGBM's kZeroThreshold (1e-35 as a float32): inputs with |x| at most this are read as 0.
ZERO_THRESHOLD = float(np.float32(1e-35))
#: Objectives whose predictions are the raw sum of leaf values (no link function).
RAW_OBJECTIVES = ("lambdarank", "rank_xendcg", "regression")
#: Largest lookup table (bytes) worth building; larger models stay with LightGBM's predict.
MAX_TABLE_BYTES = 64 << 20


class CompiledTrees:
    """Scores rows with the trees of a LightGBM model dump (``Booster.dump_model()``)."""

    def __init__(self, n_features: int, features: list[int], thresholds: list[np.ndarray], table: np.ndarray,
                 offsets: np.ndarray, leaf_values: np.ndarray) -> None:
        self.n_features = n_features
        self.features = np.asarray(features, np.intp)  # the features any split tests
        self.thresholds = thresholds  # per tested feature, its splits' thresholds, ascending
        self.table = table  # (sum over features of splits + 3, trees): per-tree leaf masks
        self.offsets = np.asarray(offsets, np.intp)  # first table row of each tested feature
        self._zero_row = np.asarray([len(t) + 1 for t in thresholds], np.intp)  # then the missing row
        self.leaf_values = leaf_values  # (trees, max leaves) float64, leaves left to right
        self._lowest_bit = _lowest_bit_table(table.dtype)
        width = leaf_values.shape[1]
        if table.dtype.itemsize == 1:  # small trees: one lookup from (tree, mask) to the leaf's value
            width, padded = 256, np.pad(leaf_values, ((0, 0), (0, 8 - leaf_values.shape[1])))
            leaf_values = padded[:, self._lowest_bit(np.arange(width, dtype=np.uint8))]
        self._values = np.ascontiguousarray(leaf_values).ravel()
        self._tree_base = np.arange(len(leaf_values), dtype=np.intp) * width

    @classmethod
    def from_dump(cls, dump: dict[str, Any]) -> "CompiledTrees | None":
        """The compiled model, or None when it uses something this evaluator does not cover."""
        objective, *options = str(dump.get("objective", "")).split() or [""]
        if (dump.get("num_tree_per_iteration", 1) != 1 or dump.get("average_output")
                or objective not in RAW_OBJECTIVES or "sqrt" in options):  # reg_sqrt squares the sum
            return None
        trees = [_flatten(t["tree_structure"]) for t in dump["tree_info"]]
        if any(t is None for t in trees) or not trees:
            return None
        width = max(len(leaves) for _, leaves in trees)
        dtype = next((d for d in (np.uint8, np.uint16, np.uint32, np.uint64) if np.iinfo(d).bits >= width), None)
        splits = [s for nodes, _ in trees for s in nodes]
        if not splits:  # constant trees: nothing to gain
            return None
        rows = len(splits) + 3 * len({s["feature"] for s in splits})
        if dtype is None or rows * len(trees) * np.dtype(dtype).itemsize > MAX_TABLE_BYTES:
            return None
        leaf_values = np.zeros((len(trees), width), np.float64)
        for t, (_, leaves) in enumerate(trees):
            leaf_values[t, :len(leaves)] = leaves
        return cls(dump["max_feature_idx"] + 1, *_tables(trees, dtype), leaf_values)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(rows, n_features) -> (rows,) float64: the sum of each row's leaf values over the trees."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected (rows, {self.n_features}) features, got {x.shape}")
        cols = np.ascontiguousarray(x[:, self.features].T)  # (tested features, rows)
        zero, missing = np.abs(cols) <= ZERO_THRESHOLD, np.isnan(cols)
        cols[zero] = 0.0
        rows = np.empty(cols.shape, np.intp)
        for j, thresholds in enumerate(self.thresholds):  # failed splits: those with threshold < value
            rows[j] = np.searchsorted(thresholds, cols[j], side="left")
        rows[zero] = np.broadcast_to(self._zero_row[:, None], rows.shape)[zero]  # Zero-missing splits: defaults
        rows[missing] = np.broadcast_to(self._zero_row[:, None] + 1, rows.shape)[missing]
        rows += self.offsets[:, None]
        masks = self.table[rows[0]]  # (rows, trees): the leaves each row can still reach
        for j in range(1, len(rows)):
            masks &= self.table[rows[j]]
        at = masks + self._tree_base if masks.dtype.itemsize == 1 else self._lowest_bit(masks) + self._tree_base
        return np.take(self._values, at).sum(axis=1)


def _flatten(root: dict[str, Any]) -> tuple[list[dict[str, Any]], list[float]] | None:
    """One tree's splits (feature, threshold, the leaf bits of its left subtree, default direction,
    missing type) and its leaf values left to right; None for a split this evaluator does not cover."""
    splits: list[dict[str, Any]] = []
    leaves: list[float] = []

    def walk(node: dict[str, Any]) -> bool:
        if "leaf_value" in node:
            leaves.append(float(node["leaf_value"]))
            return True
        if node.get("decision_type") != "<=" or node.get("missing_type") not in ("None", "Zero", "NaN"):
            return False
        first = len(leaves)
        if not walk(node["left_child"]):
            return False
        left_bits = sum(1 << b for b in range(first, len(leaves)))
        splits.append({"feature": int(node["split_feature"]), "threshold": float(node["threshold"]),
                       "left_bits": left_bits, "default_left": bool(node["default_left"]),
                       "missing": node["missing_type"]})
        return walk(node["right_child"])

    return (splits, leaves) if walk(root) else None


def _tables(trees: list[tuple[list[dict[str, Any]], list[float]]], dtype: type
            ) -> tuple[list[int], list[np.ndarray], np.ndarray, np.ndarray]:
    """Per tested feature: its thresholds ascending, and table rows for "the first p splits failed"
    (p = 0..splits), "the value is 0" and "the value is missing"."""
    full = np.asarray([(1 << len(leaves)) - 1 for _, leaves in trees], dtype)
    by_feature: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for t, (splits, _) in enumerate(trees):
        for s in splits:
            by_feature.setdefault(s["feature"], []).append((t, s))
    features, thresholds, blocks, offsets, start = [], [], [], [], 0
    for f in sorted(by_feature):
        splits = sorted(by_feature[f], key=lambda ts: ts[1]["threshold"])
        block = np.repeat(full[None, :], len(splits) + 3, axis=0)
        for p, (t, s) in enumerate(splits):  # prefix rows: splits 0..p failed
            block[p + 1:len(splits) + 1, t] &= dtype(~s["left_bits"] & int(full[t]))
        for row, value in ((len(splits) + 1, 0.0), (len(splits) + 2, np.nan)):
            for t, s in splits:
                if not _goes_left(s, value):
                    block[row, t] &= dtype(~s["left_bits"] & int(full[t]))
        features.append(f)
        thresholds.append(np.asarray([s["threshold"] for _, s in splits], np.float64))
        blocks.append(block)
        offsets.append(start)
        start += len(block)
    table = np.concatenate(blocks) if blocks else np.zeros((0, len(trees)), dtype)
    return features, thresholds, table, np.asarray(offsets, np.intp)


def _goes_left(split: dict[str, Any], value: float) -> bool:
    """LightGBM's numerical decision for one value (Tree::NumericalDecision)."""
    missing = split["missing"]
    if np.isnan(value) and missing != "NaN":
        value = 0.0
    if (missing == "Zero" and abs(value) <= ZERO_THRESHOLD) or (missing == "NaN" and np.isnan(value)):
        return split["default_left"]
    return value <= split["threshold"]


def _lowest_bit_table(dtype: np.dtype) -> Any:
    """masks -> index of each mask's lowest set bit (the leftmost reachable leaf)."""
    if np.dtype(dtype).itemsize <= 2:
        values = np.arange(1 << (8 * np.dtype(dtype).itemsize), dtype=np.int64)
        lut = np.log2(np.maximum(values & -values, 1)).astype(np.intp)
        return lambda masks: lut[masks]
    return lambda masks: np.log2((masks & (~masks + 1)).astype(np.float64)).astype(np.intp)
