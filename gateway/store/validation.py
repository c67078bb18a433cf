"""Input checks shared by the store modules: ids, strings, vectors, attribute values."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from gateway.store.base import AttributeValue
from gateway.store.layout import ID_MAX_BYTES

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_str(value: object, what: str, max_bytes: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    if len(value.encode("utf-8")) > max_bytes:
        raise ValueError(f"{what} longer than {max_bytes} bytes: {value[:40]!r}...")
    return value


def storable_id(item_id: object) -> bool:
    """Whether ``item_id`` could be a stored id (others can be dropped from exclusions)."""
    if not isinstance(item_id, str):
        raise ValueError(f"item id must be a string, got {type(item_id).__name__}")
    return 0 < len(item_id.encode("utf-8")) <= ID_MAX_BYTES


def check_id(item_id: object) -> str:
    return check_str(item_id, "item id", ID_MAX_BYTES)


def as_vector(value: object, dim: int, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (dim,):
        raise ValueError(f"{what}: expected shape ({dim},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: contains NaN or inf")
    return arr


def check_attr_value(name: str, value: object) -> AttributeValue:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str):
        return value
    if isinstance(value, Integral):
        iv = int(value)
        if not INT64_MIN <= iv <= INT64_MAX:
            raise ValueError(f"attribute {name!r}: integer out of int64 range")
        return iv
    if isinstance(value, Real):
        fv = float(value)
        if not math.isfinite(fv):
            raise ValueError(f"attribute {name!r}: non-finite value {value!r}")
        return fv
    raise ValueError(
        f"attribute {name!r}: value must be str, number or bool, got {type(value).__name__}"
    )


def vec_out(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32).reshape(-1)
