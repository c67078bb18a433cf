"""Protobuf <-> domain conversion for the Recommender API."""

from __future__ import annotations

import numpy as np

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.gateway.domain import (FilterSpec, InteractionEvent, ItemInput, ItemView, QueryContent,
                            Recommendation, RecommendQuery)
from fusionrec.retrieval.base import AttributeValue


def value_from_pb(v: pb.AttributeValue) -> AttributeValue | None:
    kind = v.WhichOneof("kind")
    return None if kind is None else getattr(v, kind)


def value_to_pb(v: AttributeValue) -> pb.AttributeValue:
    if isinstance(v, bool):  # before numbers: bool is an int subclass
        return pb.AttributeValue(bool_value=v)
    if isinstance(v, (int, float)):
        return pb.AttributeValue(number_value=float(v))
    return pb.AttributeValue(string_value=str(v))


def attributes_from_pb(attrs) -> dict[str, AttributeValue]:
    return {k: val for k, v in attrs.items() if (val := value_from_pb(v)) is not None}


def content_from_pb(c: pb.Content) -> QueryContent:
    by_modality: dict[str, str | bytes] = {}
    if c.text:
        by_modality["text"] = c.text
    if c.image:
        by_modality["image"] = bytes(c.image)
    if c.audio:
        by_modality["audio"] = bytes(c.audio)
    return QueryContent(by_modality)


def filter_from_pb(f: pb.Filter) -> FilterSpec:
    spec = FilterSpec(attribute=f.attribute)
    kind = f.WhichOneof("condition")
    if kind == "equals":
        spec.equals = value_from_pb(f.equals)
    elif kind == "range":
        spec.min = f.range.min if f.range.HasField("min") else None
        spec.max = f.range.max if f.range.HasField("max") else None
        if spec.min is None and spec.max is None:
            spec.min = float("-inf")  # an empty range is rejected by validation as non-finite
    elif kind == "in_set":
        spec.in_set = [x for v in f.in_set.values if (x := value_from_pb(v)) is not None]
    return spec


def recommend_from_pb(r: pb.RecommendRequest) -> RecommendQuery:
    return RecommendQuery(
        user_id=r.user_id, history_item_ids=list(r.history_item_ids), query=content_from_pb(r.query),
        k=r.k, filters=[filter_from_pb(f) for f in r.filters], exclude_item_ids=list(r.exclude_item_ids),
        include_seen=r.include_seen, debug_timings=r.debug_timings)


def recommendation_to_pb(rec: Recommendation) -> pb.RecommendResponse:
    return pb.RecommendResponse(
        items=[pb.ScoredItem(
            item_id=it.item_id, score=it.score,
            contributions=[pb.ModalityContribution(modality=m, score=s) for m, s in it.contributions.items()],
            attributes={k: value_to_pb(v) for k, v in it.attributes.items()}) for it in rec.items],
        request_id=rec.request_id, modalities_used=rec.modalities_used,
        modalities_dropped=[pb.DroppedModality(modality=m, reason=why) for m, why in rec.modalities_dropped.items()],
        degraded=rec.degraded, model_version=rec.model_version, encoder_versions=rec.encoder_versions,
        timings=[pb.StageTiming(stage=s, duration_ms=ms) for s, ms in rec.timings_ms.items()])


def item_from_pb(item: pb.ItemInput) -> ItemInput:
    return ItemInput(
        item_id=item.item_id, attributes=attributes_from_pb(item.attributes),
        content=content_from_pb(item.content),
        vectors={v.modality: np.asarray(v.values, dtype=np.float32) for v in item.vectors},
        vector_versions={v.modality: v.encoder_version for v in item.vectors})


def item_view_to_pb(view: ItemView) -> pb.Item:
    return pb.Item(item_id=view.item_id, attributes={k: value_to_pb(v) for k, v in view.attributes.items()},
                   modalities=view.modalities, encoder_versions=view.encoder_versions,
                   model_version=view.model_version, content_kept=view.content_kept)


def interaction_from_pb(e: pb.Interaction) -> InteractionEvent:
    return InteractionEvent(user_id=e.user_id, item_id=e.item_id, kind=e.kind or "interaction",
                            timestamp_s=e.timestamp_s, event_id=e.event_id)
