"""AttributeTable: item attributes as numpy columns per slot, filters evaluated like Milvus does.

Semantics (probed against Milvus Lite 3.2.2, see lite.py): Python comparison rules.
Strings equal only strings. Numbers and bools form one numeric domain (``true == 1``,
``1.0 == 1``); numeric ranges (inclusive, open when a bound is None) skip strings and
missing values; ints beyond 2**53 compare exactly. A missing attribute matches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fusionrec.retrieval.base import AttributeValue, FilterSpec
from fusionrec.retrieval.expressions import (
    check_filter_shape,
    format_number,
    format_value,
    validate_attribute_name,
)

_EXACT_FLOAT_INT = 2**53


def _numeric(value: object) -> float | None:
    if isinstance(value, str):
        return None
    return float(value)


def _is_inexact(value: object) -> bool:
    """An int that float64 cannot hold exactly (compare it in Python)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > _EXACT_FLOAT_INT


@dataclass
class _Column:
    num: np.ndarray  # float64, NaN where missing or a string
    code: np.ndarray  # int32 string code, -1 where missing or not a string
    codes: dict[str, int] = field(default_factory=dict)
    inexact: set[int] = field(default_factory=set)  # slots holding ints beyond 2**53


class AttributeTable:
    """Attributes of slots 0..n-1; not thread-safe by itself."""

    def __init__(self) -> None:
        self._rows: list[dict[str, AttributeValue] | None] = []
        self._cols: dict[str, _Column] = {}
        self._cap = 0

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, slot: int) -> dict[str, AttributeValue]:
        return dict(self._rows[slot] or {})

    def _column(self, name: str) -> _Column:
        col = self._cols.get(name)
        if col is None:
            col = _Column(np.full(self._cap, np.nan), np.full(self._cap, -1, dtype=np.int32))
            self._cols[name] = col
        return col

    def _grow(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = max(n, 2 * self._cap, 1024)
        for col in self._cols.values():
            num = np.full(cap, np.nan)
            num[: self._cap] = col.num
            code = np.full(cap, -1, dtype=np.int32)
            code[: self._cap] = col.code
            col.num, col.code = num, code
        self._cap = cap

    def set(self, slot: int, attrs: dict[str, AttributeValue]) -> None:
        """Give ``slot`` (existing or the next new one) exactly these attributes."""
        if slot > len(self._rows):
            raise IndexError(f"slot {slot} skips ahead of {len(self._rows)}")
        if slot == len(self._rows):
            self._rows.append(None)
            self._grow(len(self._rows))
        else:
            self.clear(slot)
        self._rows[slot] = dict(attrs)
        for name, value in attrs.items():
            col = self._column(name)
            if isinstance(value, str):
                col.code[slot] = col.codes.setdefault(value, len(col.codes))
            else:
                col.num[slot] = _numeric(value)
                if _is_inexact(value):
                    col.inexact.add(slot)

    def clear(self, slot: int) -> None:
        for name in self._rows[slot] or {}:
            col = self._cols[name]
            col.num[slot] = np.nan
            col.code[slot] = -1
            col.inexact.discard(slot)
        self._rows[slot] = None

    def memory_bytes(self) -> int:
        """Columns plus a rough size of the per-slot dicts."""
        cols = sum(c.num.nbytes + c.code.nbytes for c in self._cols.values())
        return cols + sum(64 + 100 * len(r) for r in self._rows if r)

    # ------------------------------------------------------------------ filters

    def mask(self, filters: list[FilterSpec]) -> np.ndarray:
        """(n,) bool: the slots matching every filter. Validates like the Milvus path."""
        n = len(self._rows)
        out = np.ones(n, dtype=bool)
        for spec in filters:
            out &= self._match(spec, n)
        return out

    def _match(self, spec: FilterSpec, n: int) -> np.ndarray:
        kind = check_filter_shape(spec)
        validate_attribute_name(spec.attribute)
        col = self._cols.get(spec.attribute)
        if kind == "equals":
            format_value(spec.equals)  # same validation as the Milvus expression
            return self._equals(col, spec.attribute, [spec.equals], n)
        if kind == "in_set":
            values = list(spec.in_set or [])
            for v in values:
                format_value(v)
            return self._equals(col, spec.attribute, values, n)
        lo, hi = spec.min, spec.max
        for bound in (lo, hi):
            if bound is not None:
                format_number(bound)  # same validation as the Milvus expression
        if col is None:
            return np.zeros(n, dtype=bool)
        num = col.num[:n]
        with np.errstate(invalid="ignore"):
            m = ~np.isnan(num)
            if lo is not None:
                m &= num >= float(lo)
            if hi is not None:
                m &= num <= float(hi)
        # float64 can be off only for ints beyond 2**53 (stored or bound): redo those in Python
        suspects = set(col.inexact)
        for b in (lo, hi):
            if b is not None and _is_inexact(b):
                suspects.update(np.flatnonzero(num == float(b)).tolist())
        for s in suspects:
            if s < n:
                v = self._rows[s][spec.attribute]
                m[s] = not isinstance(v, str) and (lo is None or v >= lo) and (hi is None or v <= hi)
        return m

    def _equals(self, col: _Column | None, name: str, values: list, n: int) -> np.ndarray:
        m = np.zeros(n, dtype=bool)
        if col is None or not values:
            return m
        strings = [v for v in values if isinstance(v, str)]
        numbers = [v for v in values if not isinstance(v, str)]
        codes = [col.codes[s] for s in strings if s in col.codes]
        if codes:
            m |= np.isin(col.code[:n], codes)
        exact = [float(v) for v in numbers if not _is_inexact(v)]
        if exact:
            m |= np.isin(col.num[:n], exact)
        # float64 may merge distinct big ints: decide those rows in Python
        suspects = set(col.inexact)
        for v in numbers:
            if _is_inexact(v):
                suspects.update(np.flatnonzero(col.num[:n] == float(v)).tolist())
        for s in suspects:
            if s < n:
                row_value = self._rows[s][name]
                m[s] = any(
                    not isinstance(row_value, str) and row_value == v for v in numbers
                ) or (isinstance(row_value, str) and row_value in strings)
        return m
