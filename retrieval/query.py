"""What Recommend asks of retrieval (RecommendQuery) and what retrieval answers (Ranked)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fusionrec.retrieval.base import FilterSpec


@dataclass
class QueryContent:
    """Raw content to encode, by modality ("text" -> str, "image"/"audio" -> bytes)."""

    by_modality: dict[str, str | bytes] = field(default_factory=dict)


@dataclass
class RecommendQuery:
    user_id: str
    history_item_ids: list[str]
    query: QueryContent
    k: int
    filters: list[FilterSpec]
    exclude_item_ids: list[str]
    include_seen: bool = False
    debug_timings: bool = False


@dataclass
class Ranked:
    """Retrieval's answer: candidates best first, their scores and per-part contributions ((n,) each)."""

    candidates: list
    scores: list[float]
    contributions: dict[str, np.ndarray]
    used_history: bool
    #: Nothing personal to go on (no history, no query): the candidates are the most popular items.
    popular: bool = False


__all__ = ["QueryContent", "RecommendQuery", "Ranked"]
