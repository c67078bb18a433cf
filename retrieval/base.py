"""The item/interaction store interface: the system of record behind Retrieval."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from fusionrec.core.errors import FailedPrecondition
from fusionrec.core.rules import AttributeValue


@dataclass
class StoredItem:
    """One catalog item as stored.

    modality_vectors: modality -> (dim_m,) float32, only the modalities the item has.
    fused: (fused_dim,) float32, the item tower's output.
    content: modality -> sha256 of the raw content kept in the content store
        (retrieval/content.py); empty when none was kept.
    """

    item_id: str
    attributes: dict[str, AttributeValue]
    modality_vectors: dict[str, np.ndarray]
    fused: np.ndarray
    encoder_versions: dict[str, str]
    model_version: str
    content: dict[str, str] = field(default_factory=dict)


@dataclass
class Candidate:
    """A search hit. fused: (fused_dim,) float32."""

    item_id: str
    score: float
    fused: np.ndarray
    attributes: dict[str, AttributeValue]


@dataclass
class Hits:
    """Search hits as arrays, best first: the ranking stage re-scores a few hundred of them, and only the
    ones answered become Candidates (building 200 of them cost the served path 0.4 ms).

    scores: (n,) float32; fused: (n, fused_dim) float32; attributes: n dicts.
    """

    item_ids: list[str]
    scores: np.ndarray
    fused: np.ndarray
    attributes: list[dict[str, AttributeValue]]

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def of(cls, candidates: list[Candidate], dim: int) -> "Hits":
        return cls([c.item_id for c in candidates], np.asarray([c.score for c in candidates], np.float32),
                   np.stack([c.fused for c in candidates]) if candidates else np.zeros((0, dim), np.float32),
                   [c.attributes for c in candidates])

    def candidates(self, order: np.ndarray | None = None) -> list[Candidate]:
        """The hits at ``order`` (default: all), as Candidates."""
        picks = range(len(self)) if order is None else np.asarray(order).tolist()
        return [Candidate(self.item_ids[i], float(self.scores[i]), self.fused[i], self.attributes[i]) for i in picks]


@dataclass
class FilterSpec:
    """A structured filter on one attribute: exactly one of equals / range / in_set."""

    attribute: str
    equals: AttributeValue | None = None
    min: float | None = None
    max: float | None = None
    in_set: list[AttributeValue] | None = None


@dataclass
class InteractionEvent:
    """A user-item event. ``event_id``: the caller's idempotency key, unique per user ("" = none):
    an event whose (user_id, event_id) is stored already is not stored again."""

    user_id: str
    item_id: str
    kind: str
    timestamp_s: float
    event_id: str = ""


@dataclass
class StoreSchema:
    """What the stored vectors mean; a store refuses to open over data written with another.

    modality_dims: modality -> vector length (encoders and bring-your-own modalities).
    encoder_versions: modality -> encoder version that produced the stored vectors.
    """

    modality_dims: dict[str, int]
    fused_dim: int
    encoder_versions: dict[str, str]
    model_version: str
    extra: dict[str, str] = field(default_factory=dict)


class SchemaMismatch(FailedPrecondition):
    """The store holds vectors from other encoders/model than configured."""


class StoreSwitched(SchemaMismatch):
    """Another replica switched the shared store (re-index, encoder swap) under a call: follow and retry."""


class ItemStore(ABC):
    """Items (vectors + attributes) and user interactions; the single owner of the data."""

    @abstractmethod
    def upsert(self, items: list[StoredItem]) -> None:
        """Insert or replace items; durable when it returns."""

    @abstractmethod
    def delete(self, item_ids: list[str]) -> list[str]:
        """Delete items; returns the ids that existed and were deleted."""

    @abstractmethod
    def get(self, item_ids: list[str]) -> dict[str, StoredItem]:
        """Stored items by id (missing ids are absent from the result)."""

    def fused(self, item_ids: list[str]) -> dict[str, np.ndarray]:
        """Fused vectors by id ((fused_dim,) float32; missing ids absent). Stores with an
        in-memory index override this to skip the round trip."""
        return {i: item.fused for i, item in self.get(item_ids).items()}

    @abstractmethod
    def search(
        self,
        query: np.ndarray,
        k: int,
        filters: list[FilterSpec] | None = None,
        exclude_ids: set[str] | None = None,
        only_ids: set[str] | None = None,
    ) -> list[Candidate]:
        """Top-k items by inner product with query ((fused_dim,) float32), best first; with
        ``only_ids``, among those items only."""

    def search_hits(self, query: np.ndarray, k: int, filters: list[FilterSpec] | None = None,
                    exclude_ids: set[str] | None = None) -> Hits:
        """``search`` as arrays (Hits); stores with an in-memory index override it to skip the Candidates."""
        return Hits.of(self.search(query, k, filters, exclude_ids), len(query))

    @abstractmethod
    def popularity(self) -> list[tuple[str, int]]:
        """(item id, recorded interactions), most interacted first; items never interacted with absent."""

    @abstractmethod
    def count(self) -> int:
        """Number of stored items."""

    @abstractmethod
    def iter_items(self, batch_size: int = 1000) -> Iterator[list[StoredItem]]:
        """Every stored item, in batches (for re-indexing)."""

    @abstractmethod
    def record_interactions(self, events: list[InteractionEvent]) -> int:
        """Append interaction events; durable when it returns. Returns how many were stored: events whose
        (user_id, event_id) was stored before, or earlier in ``events``, are not stored again."""

    @abstractmethod
    def history(self, user_id: str, limit: int) -> list[InteractionEvent]:
        """The user's most recent events, oldest first, at most ``limit``."""

    @abstractmethod
    def close(self) -> None:
        """Release the underlying client and any file locks."""
