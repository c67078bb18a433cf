"""Safe Milvus boolean expressions: attribute-name checks, literal quoting, filter building."""

from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Iterable, Sequence

import numpy as np

from fusionrec.core.rules import INT64_MAX, INT64_MIN, check_attribute_name, storable_id
from fusionrec.retrieval.base import FilterSpec
from fusionrec.retrieval.layout import ATTR_PREFIX, F_ID


def validate_attribute_name(name: object) -> str:
    """Return ``name`` if it is a valid attribute name (core.rules), else InvalidArgument."""
    return check_attribute_name(name)


def quote_string(value: str) -> str:
    """A double-quoted Milvus string literal for ``value`` (escapes \\ " CR LF TAB)."""
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def format_number(value: object) -> str:
    """A Milvus numeric literal; bools, NaN/inf and out-of-int64 ints are rejected."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, Integral):
        iv = int(value)
        if not INT64_MIN <= iv <= INT64_MAX:
            raise ValueError(f"integer {iv} out of int64 range")
        return str(iv)
    fv = float(value)
    if not math.isfinite(fv):
        raise ValueError(f"non-finite number {value!r} in filter")
    return repr(fv)


def format_value(value: object) -> str:
    """A Milvus literal for an attribute value (str, number or bool)."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, str):
        return quote_string(value)
    return format_number(value)


def attr_field(name: str) -> str:
    """The dynamic-field key that stores attribute ``name``."""
    return ATTR_PREFIX + validate_attribute_name(name)


def check_filter_shape(spec: FilterSpec) -> str:
    """Which part of ``spec`` is set ("equals" | "range" | "in_set"); ValueError otherwise."""
    has_eq = spec.equals is not None
    has_range = spec.min is not None or spec.max is not None
    has_set = spec.in_set is not None
    if has_eq + has_range + has_set != 1:
        raise ValueError(
            f"filter on {spec.attribute!r} must set exactly one of equals, min/max, in_set"
        )
    return "equals" if has_eq else "range" if has_range else "in_set"


def filter_clause(spec: FilterSpec) -> str | None:
    """One FilterSpec as a Milvus boolean expression; None when it can match nothing."""
    field = attr_field(spec.attribute)
    kind = check_filter_shape(spec)
    if kind == "equals":
        return f"{field} == {format_value(spec.equals)}"
    if kind == "range":
        parts = []
        if spec.min is not None:
            parts.append(f"{field} >= {format_number(spec.min)}")
        if spec.max is not None:
            parts.append(f"{field} <= {format_number(spec.max)}")
        return " and ".join(parts)
    values = list(spec.in_set or [])
    if not values:
        return None
    strings = [v for v in values if isinstance(v, str)]
    bools = [bool(v) for v in values if isinstance(v, (bool, np.bool_))]
    numbers = [v for v in values if not isinstance(v, (str, bool, np.bool_))]
    alts = []
    if strings:
        alts.append(f"{field} in [{', '.join(quote_string(s) for s in dict.fromkeys(strings))}]")
    if numbers:
        alts.append(f"{field} in [{', '.join(format_number(n) for n in numbers)}]")
    for b in dict.fromkeys(bools):
        alts.append(f"{field} == {'true' if b else 'false'}")
    return alts[0] if len(alts) == 1 else " or ".join(f"({a})" for a in alts)


def id_list(ids: Iterable[str]) -> str:
    return "[" + ", ".join(quote_string(i) for i in ids) + "]"


def build_filter(
    filters: Sequence[FilterSpec] | None, exclude_ids: Iterable[str] | None = None
) -> str | None:
    """The conjunction of ``filters`` and ``id not in exclude_ids``.

    Returns "" for no condition and None when the filters can match nothing.
    Raises ValueError for an invalid attribute name or value.
    """
    clauses = []
    for spec in filters or []:
        clause = filter_clause(spec)
        if clause is None:
            return None
        clauses.append(clause)
    excluded = sorted({i for i in exclude_ids or () if storable_id(i)})
    if excluded:
        clauses.append(f"{F_ID} not in {id_list(excluded)}")
    if len(clauses) == 1:
        return clauses[0]
    return " and ".join(f"({c})" for c in clauses)
