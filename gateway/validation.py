"""Request checks against the configured limits; each failure names the field to fix.

What can be stored at all (id sizes, attribute names and values, kinds) is core/rules.py, the same
rules the store applies; this module adds the per-request limits of LimitsConfig.
"""

from __future__ import annotations

import math
import time

import numpy as np

from fusionrec.core import rules
from fusionrec.core.errors import InvalidArgument
from fusionrec.gateway.config import LimitsConfig
from fusionrec.gateway.domain import FilterSpec, InteractionEvent, ItemInput, RecommendQuery


def check_id(value: str, what: str, limits: LimitsConfig) -> None:
    rules.check_id(value, what, limits.max_id_bytes)


def check_filters(filters: list[FilterSpec], limits: LimitsConfig) -> None:
    if len(filters) > limits.max_filters:
        raise InvalidArgument(f"{len(filters)} filters given; the limit is {limits.max_filters}")
    for i, f in enumerate(filters):
        what = f"filters[{i}]"
        rules.check_attribute_name(f.attribute, f"{what}.attribute")
        kinds = [f.equals is not None, f.min is not None or f.max is not None, f.in_set is not None]
        if sum(kinds) != 1:
            raise InvalidArgument(f"{what} must set exactly one of equals, range or in_set")
        if f.min is not None and f.max is not None and f.min > f.max:
            raise InvalidArgument(f"{what}.range has min {f.min} > max {f.max}")
        for bound in (f.min, f.max):
            if bound is not None and not math.isfinite(bound):
                raise InvalidArgument(f"{what}.range bounds must be finite numbers")
        if f.in_set is not None and not 1 <= len(f.in_set) <= limits.max_set_values:
            raise InvalidArgument(f"{what}.in_set needs 1..{limits.max_set_values} values, got {len(f.in_set)}")


#: A bring-your-own vector's largest |value| and smallest norm: beyond them fusion overflows to NaN or
#: fuses to zero (denormals), so the caller's mistake would surface as INTERNAL or as a silent no-op.
VECTOR_MAX_ABS = 1e6
VECTOR_MIN_NORM = 1e-6


def check_vector_values(vec: np.ndarray, what: str) -> None:
    """InvalidArgument unless ``vec`` is finite, bounded and of a usable (normal, non-zero) norm."""
    if not np.isfinite(vec).all():
        raise InvalidArgument(f"{what} must be finite (no NaN or inf)")
    if np.abs(vec).max(initial=0.0) > VECTOR_MAX_ABS:
        raise InvalidArgument(f"{what} has values beyond ±{VECTOR_MAX_ABS:g}; send it normalised")
    if float(np.linalg.norm(vec.astype(np.float64))) < VECTOR_MIN_NORM:
        raise InvalidArgument(f"{what} is all zero or denormal (norm < {VECTOR_MIN_NORM:g})")


def check_recommend(q: RecommendQuery, limits: LimitsConfig) -> None:
    """Raise InvalidArgument unless the query is well-formed; fills in the default k."""
    if q.user_id:
        check_id(q.user_id, "user_id", limits)
    elif not q.history_item_ids and not q.query.by_modality:
        raise InvalidArgument("send a user_id, history_item_ids or query content")
    if q.k == 0:
        q.k = limits.default_k
    if not 1 <= q.k <= limits.max_k:
        raise InvalidArgument(f"k must be between 1 and {limits.max_k}, got {q.k}")
    if len(q.history_item_ids) > limits.max_history:
        raise InvalidArgument(f"history_item_ids has {len(q.history_item_ids)} ids; the limit is {limits.max_history}")
    if len(q.exclude_item_ids) > limits.max_exclude_ids:
        raise InvalidArgument(f"exclude_item_ids has {len(q.exclude_item_ids)} ids; the limit is {limits.max_exclude_ids}")
    for i, item_id in enumerate(q.history_item_ids):
        check_id(item_id, f"history_item_ids[{i}]", limits)
    check_filters(q.filters, limits)


def check_items(items: list[ItemInput], limits: LimitsConfig, modality_dims: dict[str, int],
                encoded_modalities: set[str]) -> None:
    """Raise InvalidArgument unless every item can be stored."""
    if not items:
        raise InvalidArgument("items must not be empty")
    if len(items) > limits.max_upsert_batch:
        raise InvalidArgument(f"{len(items)} items in one call; the limit is {limits.max_upsert_batch}: split the batch")
    seen: set[str] = set()
    for i, item in enumerate(items):
        what = f"items[{i}] ({item.item_id!r})"
        check_id(item.item_id, f"items[{i}].item_id", limits)
        if item.item_id in seen:
            raise InvalidArgument(f"{what}: item_id appears twice in the batch")
        seen.add(item.item_id)
        rules.check_attributes(item.attributes, what)
        for modality in item.content.by_modality:
            if modality not in encoded_modalities:
                raise InvalidArgument(f"{what}: no encoder is configured for {modality} content")
        for modality, vec in item.vectors.items():
            if modality not in modality_dims:
                raise InvalidArgument(f"{what}: unknown vector modality {modality!r}; known: {sorted(modality_dims)}")
            if modality in item.content.by_modality:
                raise InvalidArgument(f"{what}: {modality} given both as content and as a vector")
            if vec.shape != (modality_dims[modality],):
                raise InvalidArgument(f"{what}: {modality} vector has {vec.size} values, expected {modality_dims[modality]}")
            check_vector_values(vec, f"{what}: {modality} vector")
        if not item.content.by_modality and not item.vectors:
            raise InvalidArgument(f"{what}: give content or vectors for at least one modality")


def check_interactions(events: list[InteractionEvent], limits: LimitsConfig, now_s: float | None = None) -> None:
    """Raise InvalidArgument unless every event can be recorded; a timestamp of 0 (now) is not checked."""
    if not events:
        raise InvalidArgument("interactions must not be empty")
    if len(events) > limits.max_interactions_batch:
        raise InvalidArgument(f"{len(events)} interactions in one call; the limit is {limits.max_interactions_batch}")
    now_s = time.time() if now_s is None else now_s
    for i, e in enumerate(events):
        check_id(e.user_id, f"interactions[{i}].user_id", limits)
        check_id(e.item_id, f"interactions[{i}].item_id", limits)
        rules.check_kind(e.kind, f"interactions[{i}].kind")
        rules.check_event_id(e.event_id, f"interactions[{i}].event_id")
        if e.timestamp_s != 0:
            rules.check_timestamp(e.timestamp_s, now_s, limits.max_future_skew_s, limits.min_timestamp_s,
                                  f"interactions[{i}].timestamp_s")
