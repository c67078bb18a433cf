"""Python values -> fusionrec.v1 messages: attribute values, filters, content, items, interactions and
the Recommend request. Pure functions: no channel, no network.

Filters are a mapping from attribute name to a condition::

    {"mood": "calm"}                   # equals (str, number or bool)
    {"year": (2000, 2015)}             # inclusive range; (2000, None) is year >= 2000
    {"year": Range(min=2000)}          # the same, spelled out
    {"category": {"cat", "horse"}}     # one of a set (a list works too)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

from fusionrec.v1 import recommender_pb2 as pb

Scalar = Union[str, int, float, bool]
#: Media content: bytes are sent as they are, a str or a path names a file to read.
Media = Union[bytes, bytearray, memoryview, str, os.PathLike, None]
Filters = Union[Mapping[str, object], Iterable[pb.Filter], None]


@dataclass(frozen=True)
class Range:
    """An inclusive numeric range; a ``None`` bound is open."""

    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        for bound in (self.min, self.max):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, Real)
                                      or not math.isfinite(bound)):
                raise ValueError(f"range bounds must be finite numbers or None, got {bound!r}")
        if self.min is None and self.max is None:
            raise ValueError("a range open at both ends matches everything: leave the filter out")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is above max {self.max}")


def value_to_pb(value: Scalar) -> pb.AttributeValue:
    """A str, number or bool as an AttributeValue (ints become numbers: the API has one number kind)."""
    if isinstance(value, bool):  # before numbers: bool is an int subclass
        return pb.AttributeValue(bool_value=value)
    if isinstance(value, Real):
        if not math.isfinite(value):
            raise ValueError(f"attribute values must be finite, got {value!r}")
        return pb.AttributeValue(number_value=float(value))
    if isinstance(value, str):
        return pb.AttributeValue(string_value=value)
    raise TypeError(f"attribute values are str, number or bool, got {type(value).__name__}: {value!r}")


def value_from_pb(value: pb.AttributeValue) -> Scalar | None:
    """The Python value of an AttributeValue (None when unset)."""
    kind = value.WhichOneof("kind")
    return None if kind is None else getattr(value, kind)


def attributes_to_pb(attributes: Mapping[str, Scalar] | None) -> dict[str, pb.AttributeValue]:
    return {name: value_to_pb(v) for name, v in (attributes or {}).items()}


def attributes_from_pb(attributes) -> dict[str, Scalar]:
    """A protobuf attribute map (ScoredItem.attributes, Item.attributes) as a plain dict."""
    return {name: v for name, pv in attributes.items() if (v := value_from_pb(pv)) is not None}


def _set_order(value: Scalar) -> tuple[str, Scalar]:
    return type(value).__name__, value  # mixed kinds sort by kind first: never compares str with float


def filter_to_pb(attribute: str, condition: object) -> pb.Filter:
    """One filter: a scalar is equality, a (min, max) tuple or Range a range, a set or list membership."""
    if not isinstance(attribute, str) or not attribute:
        raise ValueError(f"filter attribute names are non-empty strings, got {attribute!r}")
    if isinstance(condition, tuple):
        if len(condition) != 2:
            raise ValueError(f"filter {attribute!r}: a range is a (min, max) pair, got {condition!r}")
        condition = Range(*condition)
    if isinstance(condition, Range):
        bounds = {k: v for k, v in (("min", condition.min), ("max", condition.max)) if v is not None}
        return pb.Filter(attribute=attribute, range=pb.NumericRange(**{k: float(v) for k, v in bounds.items()}))
    if isinstance(condition, (set, frozenset, list)):
        if not condition:
            raise ValueError(f"filter {attribute!r}: an empty set matches nothing")
        values = [value_to_pb(v) for v in sorted(set(condition), key=_set_order)]
        return pb.Filter(attribute=attribute, in_set=pb.ValueSet(values=values))
    try:
        return pb.Filter(attribute=attribute, equals=value_to_pb(condition))  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"filter {attribute!r}: use a value, a (min, max) tuple, a Range or a set; "
                        f"got {type(condition).__name__}") from None


def filters_to_pb(filters: Filters) -> list[pb.Filter]:
    """A mapping of attribute -> condition (see the module doc), or Filter messages as they are."""
    if filters is None:
        return []
    if isinstance(filters, Mapping):
        return [filter_to_pb(name, cond) for name, cond in filters.items()]
    out = list(filters)
    if not all(isinstance(f, pb.Filter) for f in out):
        raise TypeError("filters are a mapping {attribute: condition} or fusionrec.v1 Filter messages")
    return out


def media_bytes(media: Media, what: str = "media") -> bytes:
    """Bytes as they are; a str or path is a file to read (b'' for None)."""
    if media is None:
        return b""
    if isinstance(media, (bytes, bytearray, memoryview)):
        return bytes(media)
    if isinstance(media, (str, os.PathLike)):
        return Path(media).read_bytes()
    raise TypeError(f"{what}: give bytes or a file path, got {type(media).__name__}")


def content_to_pb(text: str = "", image: Media = None, audio: Media = None) -> pb.Content:
    if not isinstance(text, str):
        raise TypeError(f"text is a str, got {type(text).__name__}")
    return pb.Content(text=text, image=media_bytes(image, "image"), audio=media_bytes(audio, "audio"))


def item(item_id: str, *, text: str = "", image: Media = None, audio: Media = None,
         attributes: Mapping[str, Scalar] | None = None,
         vectors: Mapping[str, Sequence[float] | Mapping[str, object]] | None = None) -> pb.ItemInput:
    """An item to upsert. ``vectors``: modality -> floats, or ``{"values": [...], "encoder_version": "..."}``."""
    mvs = []
    for modality, vec in (vectors or {}).items():
        spec = vec if isinstance(vec, Mapping) else {"values": vec}
        mvs.append(pb.ModalityVector(modality=modality, values=[float(x) for x in spec["values"]],  # type: ignore[union-attr]
                                     encoder_version=str(spec.get("encoder_version", ""))))
    return pb.ItemInput(item_id=item_id, attributes=attributes_to_pb(attributes),
                        content=content_to_pb(text, image, audio), vectors=mvs)


def interaction(user_id: str, item_id: str, kind: str = "", timestamp_s: float = 0.0,
                event_id: str = "") -> pb.Interaction:
    """A user-item event; ``timestamp_s`` 0 means now. ``event_id``: an idempotency key unique per user
    (e.g. a UUID made when the event happened): sending the same event again (a retry) does not record it
    twice, and the reply counts it under ``duplicates``."""
    return pb.Interaction(user_id=user_id, item_id=item_id, kind=kind, timestamp_s=float(timestamp_s),
                          event_id=event_id)


def recommend_request(user_id: str = "", *, k: int = 10, text: str = "", image: Media = None, audio: Media = None,
                      history: Sequence[str] = (), filters: Filters = None, exclude: Sequence[str] = (),
                      include_seen: bool = False, timings: bool = False) -> pb.RecommendRequest:
    """A RecommendRequest from Python values (see Client.recommend)."""
    return pb.RecommendRequest(
        user_id=user_id, k=k, history_item_ids=list(history), query=content_to_pb(text, image, audio),
        filters=filters_to_pb(filters), exclude_item_ids=list(exclude), include_seen=include_seen,
        debug_timings=timings)
