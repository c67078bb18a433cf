"""Domain types the servicer converts protobuf to and from (no protobuf, no Ray here)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fusionrec.retrieval.base import AttributeValue, FilterSpec, InteractionEvent
from fusionrec.retrieval.query import QueryContent, Ranked, RecommendQuery


@dataclass
class ScoredItem:
    item_id: str
    score: float
    contributions: dict[str, float]
    attributes: dict[str, AttributeValue]


@dataclass
class Recommendation:
    items: list[ScoredItem]
    request_id: str
    modalities_used: list[str]
    modalities_dropped: dict[str, str]
    model_version: str
    encoder_versions: dict[str, str]
    timings_ms: dict[str, float]

    @property
    def degraded(self) -> bool:
        return bool(self.modalities_dropped)


@dataclass
class ItemInput:
    """An item to upsert: content to encode and/or precomputed vectors ((dim,) float32)."""

    item_id: str
    attributes: dict[str, AttributeValue]
    content: QueryContent
    vectors: dict[str, np.ndarray]
    vector_versions: dict[str, str] = field(default_factory=dict)


@dataclass
class ItemView:
    item_id: str
    attributes: dict[str, AttributeValue]
    modalities: list[str]
    encoder_versions: dict[str, str]
    model_version: str
    #: modalities whose raw content is kept (content retention)
    content_kept: list[str] = field(default_factory=list)


__all__ = ["FilterSpec", "InteractionEvent", "QueryContent", "RecommendQuery", "ScoredItem",
           "Recommendation", "Ranked", "ItemInput", "ItemView"]
