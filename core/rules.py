"""The one rule set for what fusionrec stores: ids, attribute names and values, interaction kinds,
vectors. The gRPC edge (gateway/validation.py) and the store (retrieval/) both call these, so a
request the edge accepts is one the store can write, and a violation is always InvalidArgument.

Sizes are UTF-8 bytes, as Milvus' VARCHAR fields count them, never characters.
"""

from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Union

import numpy as np

from fusionrec.core.errors import InvalidArgument

AttributeValue = Union[str, int, float, bool]

ID_MAX_BYTES = 256  # item and user ids (VARCHAR(256) primary keys)
VERSION_MAX_BYTES = 256  # encoder and model version strings
KIND_MAX_BYTES = 64  # interaction kind ("play", "click", ...)
EVENT_ID_MAX_BYTES = 128  # an interaction's idempotency key, unique per user
ATTRIBUTE_NAME_MAX = 64
MAX_ATTRIBUTES = 64  # per item
STRING_ATTRIBUTE_MAX_BYTES = 4096
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_ATTRIBUTE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,%d}" % (ATTRIBUTE_NAME_MAX - 1))


def check_str(value: object, what: str, max_bytes: int, allow_empty: bool = False) -> str:
    """``value`` if it is a string of at most ``max_bytes`` UTF-8 bytes (and not empty unless allowed)."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidArgument(f"{what} must not be empty")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidArgument(f"{what} is {size} bytes in UTF-8; the limit is {max_bytes}: {value[:40]!r}...")
    return value


def check_id(value: object, what: str = "item id", max_bytes: int = ID_MAX_BYTES) -> str:
    return check_str(value, what, min(max_bytes, ID_MAX_BYTES))


def storable_id(item_id: object) -> bool:
    """Whether ``item_id`` could be a stored id (others can be dropped from exclusions)."""
    if not isinstance(item_id, str):
        raise InvalidArgument(f"item id must be a string, got {type(item_id).__name__}")
    return 0 < len(item_id.encode("utf-8", "surrogatepass")) <= ID_MAX_BYTES


def check_kind(kind: object, what: str = "interaction kind") -> str:
    return check_str(kind, what, KIND_MAX_BYTES, allow_empty=True)


def check_event_id(event_id: object, what: str = "interaction event_id") -> str:
    """An interaction's idempotency key: "" (none) or at most EVENT_ID_MAX_BYTES UTF-8 bytes."""
    return check_str(event_id, what, EVENT_ID_MAX_BYTES, allow_empty=True)


def check_timestamp(ts: float, now_s: float, max_future_skew_s: float, min_timestamp_s: float,
                    what: str = "timestamp_s") -> float:
    """``ts`` (seconds since the epoch) unless non-finite, before ``min_timestamp_s`` or more than
    ``max_future_skew_s`` after ``now_s``: an event from the future would stay "most recent" forever."""
    if not math.isfinite(ts) or ts < 0:
        raise InvalidArgument(f"{what} must be a non-negative number of seconds since the epoch, got {ts!r}")
    if ts > now_s + max_future_skew_s:
        hint = " (it looks like milliseconds: send seconds)" if ts > now_s * 500 else ""
        raise InvalidArgument(f"{what} {ts:.3f} is {ts - now_s:.0f} s ahead of the server's clock; the limit is "
                              f"limits.max_future_skew_s = {max_future_skew_s:g} s{hint}")
    if ts < min_timestamp_s:
        raise InvalidArgument(f"{what} {ts:.3f} is before limits.min_timestamp_s = {min_timestamp_s:.0f} "
                              "(seconds since the epoch; 0 means now)")
    return float(ts)


def check_attribute_name(name: object, what: str = "attribute name") -> str:
    """``name`` if it is letters, digits and _, starting with a letter or _, at most 64 (whole string)."""
    if not isinstance(name, str) or _ATTRIBUTE_NAME.fullmatch(name) is None:
        raise InvalidArgument(f"{what} {name!r} is not a valid attribute name (letters, digits and _, "
                              f"starting with a letter or _, at most {ATTRIBUTE_NAME_MAX})")
    return name


def check_attr_value(name: str, value: object) -> AttributeValue:
    """A storable attribute value: str (bounded), int64, finite float or bool."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str):
        return check_str(value, f"attribute {name!r}", STRING_ATTRIBUTE_MAX_BYTES, allow_empty=True)
    if isinstance(value, Integral):
        if not INT64_MIN <= int(value) <= INT64_MAX:
            raise InvalidArgument(f"attribute {name!r}: integer out of int64 range")
        return int(value)
    if isinstance(value, Real):
        if not math.isfinite(float(value)):
            raise InvalidArgument(f"attribute {name!r}: non-finite value {value!r}")
        return float(value)
    raise InvalidArgument(f"attribute {name!r}: value must be str, number or bool, got {type(value).__name__}")


def check_attributes(attributes: dict[str, object], what: str = "item") -> dict[str, AttributeValue]:
    """Every name and value checked; at most MAX_ATTRIBUTES of them."""
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidArgument(f"{what} has {len(attributes)} attributes; the limit is {MAX_ATTRIBUTES}")
    return {check_attribute_name(name, f"{what} attribute"): check_attr_value(name, value)
            for name, value in attributes.items()}


def as_vector(value: object, dim: int, what: str) -> np.ndarray:
    """``value`` as a finite (dim,) float32 array."""
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (dim,):
        raise InvalidArgument(f"{what}: expected shape ({dim},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidArgument(f"{what}: contains NaN or inf (or values beyond float32)")
    return arr
