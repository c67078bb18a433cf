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


def filter_clause(spec: FilterSpec, server: bool = False) -> str | None:
    """One FilterSpec as a Milvus boolean expression; None when it can match nothing.

    ``server``: for a Milvus server, which compares bools only with bools (Lite, like Python, has
    ``true == 1``) and refuses ``in`` lists mixing ints and floats; the clause then spells out the
    bool/number matches, so that both give the same answers (server_clause).
    """
    field = attr_field(spec.attribute)
    kind = check_filter_shape(spec)
    if server:
        return server_clause(field, kind, spec)
    if kind == "equals":
        return f"{field} == {format_value(spec.equals)}"
    if kind == "range":
        return _range(field, spec.min, spec.max)
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
    return _any(alts)


def _range(field: str, lo: object, hi: object) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{field} >= {format_number(lo)}")
    if hi is not None:
        parts.append(f"{field} <= {format_number(hi)}")
    return " and ".join(parts)


def _any(alts: list[str]) -> str | None:
    if not alts:
        return None
    return alts[0] if len(alts) == 1 else " or ".join(f"({a})" for a in alts)


def _exact(n: object) -> object:
    """An integral float as the int it equals (within int64): the server compares an int with a float
    literal in double precision (2**60 + 1 == 2.0**60), with an int literal exactly, as Python does."""
    if isinstance(n, (float, np.floating)) and math.isfinite(n) and float(n).is_integer() \
            and INT64_MIN <= n <= INT64_MAX:
        return int(n)
    return n


def server_clause(field: str, kind: str, spec: FilterSpec) -> str | None:
    """The clause for a Milvus server with Lite's (Python's) meaning: a bool equals the number 0 or 1,
    and a numeric range holds a bool whose 0/1 lies in it. Probed on Milvus 2.3.5: ints and floats
    compare by value (``1 == 1.0``, but in double precision), bools only with bools, ``in [1, 2.5]``
    fails the query."""
    if kind == "range":
        lo, hi = _exact(spec.min), _exact(spec.max)
        alts = [_range(field, lo, hi)]
        alts += [f"{field} == {b}" for n, b in ((0, "false"), (1, "true"))
                 if (lo is None or float(lo) <= n) and (hi is None or n <= float(hi))]
        return _any(alts)
    values = [spec.equals] if kind == "equals" else list(spec.in_set or [])
    strings = list(dict.fromkeys(v for v in values if isinstance(v, str)))
    numbers = [v for v in values if not isinstance(v, (str, bool, np.bool_))]
    for n in numbers:
        format_number(n)  # ValueError for anything but a finite int64 or float
    numbers = [_exact(n) for n in numbers]
    bools = {bool(v) for v in values if isinstance(v, (bool, np.bool_))}
    bools |= {bool(n) for n in numbers if float(n) in (0.0, 1.0)}  # 1 and 1.0 match true
    numbers += [int(b) for b in bools]  # true matches 1 (and 1.0)
    alts = []
    if strings:
        alts.append(f"{field} in [{', '.join(quote_string(s) for s in strings)}]")
    for group in (Integral, float):  # one element type per `in` list
        same = list(dict.fromkeys(format_number(n) for n in numbers
                                  if isinstance(n, Integral) == (group is Integral)))
        if same:
            alts.append(f"{field} in [{', '.join(same)}]")
    alts += [f"{field} == {'true' if b else 'false'}" for b in sorted(bools)]
    return _any(alts)


def id_list(ids: Iterable[str]) -> str:
    return "[" + ", ".join(quote_string(i) for i in ids) + "]"


def build_filter(
    filters: Sequence[FilterSpec] | None, exclude_ids: Iterable[str] | None = None, server: bool = False
) -> str | None:
    """The conjunction of ``filters`` and ``id not in exclude_ids`` (``server``: see filter_clause).

    Returns "" for no condition and None when the filters can match nothing.
    Raises ValueError for an invalid attribute name or value.
    """
    clauses = []
    for spec in filters or []:
        clause = filter_clause(spec, server)
        if clause is None:
            return None
        clauses.append(clause)
    excluded = sorted({i for i in exclude_ids or () if storable_id(i)})
    if excluded:
        clauses.append(f"{F_ID} not in {id_list(excluded)}")
    if len(clauses) == 1:
        return clauses[0]
    return " and ".join(f"({c})" for c in clauses)
