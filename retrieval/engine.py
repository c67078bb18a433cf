"""RetrievalEngine: Recommend's core next to the data (history -> user vector -> search -> attribution).

Plain Python over a MilvusStore and a FusionModel object: no Ray here. The Retrieval deployment
(gateway/deployments.py) wraps one, pulling the fusion model from the Fusion deployment; a
notebook or a test can drive one directly.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fusionrec.core.errors import InvalidArgument, NotFound
from fusionrec.fusion.base import FusionModel
from fusionrec.retrieval.base import InteractionEvent, StoredItem, StoreSchema
from fusionrec.retrieval.query import Ranked, RecommendQuery

if TYPE_CHECKING:
    from fusionrec.retrieval.milvus import MilvusStore


class RetrievalEngine:
    """Items, vectors, attributes and interaction history of one store, and recommendations over them.

    Store calls run one at a time (Milvus Lite is single-threaded), except ``reindex``: searches
    keep reading the old vectors until the store switches, and writes wait on the store's own
    write lock. Thread-safe.
    """

    def __init__(self, store: MilvusStore) -> None:
        self.store = store
        self._lock = threading.RLock()  # one client call at a time: Milvus Lite is single-threaded

    @classmethod
    def open(cls, uri: str, schema: StoreSchema, *, token: str = "", items_collection: str = "items",
             interactions_collection: str = "interactions", search_backend: str = "memory",
             index_params: dict[str, Any] | None = None, flush_every_rows: int | None = None) -> "RetrievalEngine":
        """Open (or create) the Milvus store at ``uri`` (options: see MilvusStore).

        A store whose fused vectors come from another fusion model than ``schema`` names opens
        as stored (``self.schema``); ``reindex`` moves it to the configured model.
        """
        from fusionrec.retrieval.milvus import MilvusStore  # pymilvus and faiss load only where the data is

        return cls(MilvusStore(uri, schema, items_collection=items_collection,
                               interactions_collection=interactions_collection, token=token,
                               search_backend=search_backend, index_params=index_params,
                               accept_stored_model=True, flush_every_rows=flush_every_rows))

    @property
    def schema(self) -> StoreSchema:
        """What the stored vectors are (encoder versions, fusion model version, dims)."""
        return self.store.schema

    def close(self) -> None:
        self.store.close()

    # ----------------------------------------------------------------- items

    def count(self) -> int:
        with self._lock:
            return self.store.count()

    def upsert(self, items: list[StoredItem]) -> int:
        with self._lock:
            self.store.upsert(items)
        return len(items)

    def delete(self, item_ids: list[str]) -> list[str]:
        with self._lock:
            return self.store.delete(item_ids)

    def get(self, item_ids: list[str]) -> dict[str, StoredItem]:
        with self._lock:
            return self.store.get(item_ids)

    def fused_vectors(self, item_ids: list[str]) -> tuple[list[str], np.ndarray]:
        """Known ids among item_ids (order kept) and their (n, fused_dim) vectors."""
        with self._lock:
            found = self.store.fused(item_ids)
        ids = [i for i in item_ids if i in found]
        vecs = np.stack([found[i] for i in ids]) if ids else np.zeros((0, self.schema.fused_dim), np.float32)
        return ids, vecs

    # ----------------------------------------------------------------- users

    def history_vectors(self, user_id: str, limit: int) -> tuple[list[str], np.ndarray]:
        """The user's recent item ids (oldest first) and their fused vectors."""
        with self._lock:
            events = self.store.history(user_id, limit)
        return self.fused_vectors([e.item_id for e in events])

    def record_interactions(self, events: list[InteractionEvent]) -> int:
        """Append events; raises NotFound, recording nothing, when one names an unknown item."""
        with self._lock:
            known = self.store.fused(sorted({e.item_id for e in events}))
            missing = sorted({e.item_id for e in events} - set(known))
            if missing:
                raise NotFound(f"interactions name unknown items {missing[:10]}; upsert them first "
                               "(nothing from this batch was recorded)")
            self.store.record_interactions(events)
        return len(events)

    # ----------------------------------------------------------------- recommend

    def recommend(self, q: RecommendQuery, query: dict[str, np.ndarray], model: FusionModel,
                  history_limit: int) -> Ranked | None:
        """History -> user vector -> search -> per-modality attribution, with fusion ``model``.

        Args:
            q: who (user_id or history_item_ids), k, filters, exclusions; seen items are left
                out unless ``q.include_seen``.
            query: modality -> (modality_dims[m],) encoded query content; may be empty.
            model: the fusion model the stored fused vectors were made with.
            history_limit: most recent events of ``q.user_id`` to use.
        Returns:
            the ranked candidates, or None when ``model`` is not the one the stored vectors
            were made with (the store was re-indexed meanwhile).
        Raises:
            NotFound: no usable history and no query content.
            InvalidArgument: the model cannot use the request (e.g. an unknown query modality).
        """
        if model.version != self.schema.model_version:
            return None
        with self._lock:
            history_ids, history = self._history(q, model.dim, history_limit)
            if not len(history) and not query:
                raise NotFound(f"user {q.user_id!r} has no recorded interactions and the request carries "
                               "no usable history or query content; send history_item_ids or query content")
            try:
                user = model.user_vector(history, query)
            except ValueError as err:  # e.g. a query only in modalities this model was not trained on
                raise InvalidArgument(f"fusion model {model.version} cannot use this request: {err}") from None
            exclude = set(q.exclude_item_ids) | (set() if q.include_seen else set(history_ids))
            candidates = self.store.search(user, q.k, q.filters, exclude)
        if not candidates:
            return Ranked([], [], {}, bool(len(history)))
        fused = np.stack([c.fused for c in candidates])
        return Ranked(candidates, (fused @ user).tolist(), model.contributions(user, fused), bool(len(history)))

    def _history(self, q: RecommendQuery, dim: int, limit: int) -> tuple[list[str], np.ndarray]:
        if q.history_item_ids:
            return self.fused_vectors(q.history_item_ids)
        if q.user_id:
            return self.history_vectors(q.user_id, limit)
        return [], np.zeros((0, dim), np.float32)

    # ----------------------------------------------------------------- re-indexing

    def reindex(self, model: FusionModel, batch_size: int = 1000) -> int:
        """Recompute every fused vector with ``model`` from the stored modality vectors, then
        switch the store to them atomically. Returns the number of items re-indexed.

        Without the engine lock: searches keep reading the old vectors until the store
        switches; writes wait on the store's own write lock.
        """

        def fused_for(batch: list[StoredItem]) -> np.ndarray:
            return model.item_vectors([b.modality_vectors for b in batch], [b.item_id for b in batch])

        new_schema = replace(self.schema, fused_dim=model.dim, model_version=model.version)
        return self.store.reindex(new_schema, fused_for, batch_size)
