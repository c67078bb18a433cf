"""RetrievalEngine: Recommend's core next to the data (history -> user vector -> search -> attribution).

Plain Python over a MilvusStore and a FusionModel object: no Ray here. The Retrieval deployment
(gateway/deployments.py) wraps one, pulling the fusion model from the Fusion deployment; a
notebook or a test can drive one directly.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fusionrec.core.errors import FailedPrecondition, InvalidArgument, NotFound
from fusionrec.fusion.base import FusionModel
from fusionrec.ranking.features import CandidateList
from fusionrec.ranking.stage import RankingStage, query_vector
from fusionrec.retrieval.base import Candidate, FilterSpec, InteractionEvent, StoredItem, StoreSchema, StoreSwitched
from fusionrec.retrieval.content import ContentStore
from fusionrec.retrieval.query import Ranked, RecommendQuery
from fusionrec.retrieval.swap import COMMIT_BATCH_ITEMS

if TYPE_CHECKING:
    from fusionrec.retrieval.milvus import MilvusStore
    from fusionrec.retrieval.server_items import ServerOptions


#: Popular items are looked up this many ids at a time, most popular first, until k pass the filters.
POPULAR_CHUNK = 1024


class RetrievalEngine:
    """Items, vectors, attributes and interaction history of one store, and recommendations over them.

    On Milvus Lite store calls run one at a time (Lite is single-threaded), except ``reindex``:
    searches keep reading the old vectors until the store switches, and writes wait on the store's
    own write lock. On a server they run concurrently (the server orders them), and the engine
    follows switches made by other replicas (``sync``). Thread-safe.
    """

    def __init__(self, store: MilvusStore, content: ContentStore | None = None,
                 ranking: RankingStage | None = None) -> None:
        self.store = store
        #: where items' raw content is kept (retrieval/content.py); None: content is not kept
        self.content = content
        #: re-scores the top N candidates of a search (fusionrec.ranking.stage); None: the search's order
        self.ranking = ranking
        # one client call at a time on Lite (single-threaded); a server takes concurrent calls
        self._lock = contextlib.nullcontext() if store.shared else threading.RLock()

    @classmethod
    def open(cls, uri: str, schema: StoreSchema, *, token: str = "", items_collection: str = "items",
             interactions_collection: str = "interactions", search_backend: str = "auto",
             index_params: dict[str, Any] | None = None, flush_every_rows: int | None = None,
             content: ContentStore | None = None, server: ServerOptions | None = None,
             ranking: RankingStage | None = None) -> "RetrievalEngine":
        """Open (or create) the Milvus store at ``uri`` (options: see MilvusStore); ``content``
        keeps the raw content of upserted items (None: not kept); ``ranking`` re-scores candidates.

        A store whose fused vectors come from another fusion model than ``schema`` names opens
        as stored (``self.schema``); ``reindex`` moves it to the configured model.
        """
        from fusionrec.retrieval.milvus import MilvusStore  # pymilvus and faiss load only where the data is

        return cls(MilvusStore(uri, schema, items_collection=items_collection,
                               interactions_collection=interactions_collection, token=token,
                               search_backend=search_backend, index_params=index_params,
                               accept_stored_model=True, flush_every_rows=flush_every_rows, server=server), content,
                   ranking)

    def sync(self, force: bool = False) -> bool:
        """Follow a re-index or swap another replica committed on a shared server (MilvusStore.sync)."""
        return self.store.sync(force)

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

    def upsert(self, items: list[StoredItem], contents: list[dict[str, str | bytes]] | None = None,
               shadow: dict[str, dict[str, np.ndarray]] | None = None) -> int:
        """Insert or replace items.

        Args:
            shadow: during an encoder swap, modality -> item id -> the incoming encoder's vector,
                kept beside the served ones (written first: a failed write leaves a harmless extra).
            contents: per item (same order), modality -> the raw content its vector was encoded
                from. With a content store, it is kept first and its hashes recorded with the
                item (``StoredItem.content``); a write that fails afterwards may leave kept
                content no item refers to, which is harmless (content is keyed by hash).
        """
        if contents is not None and self.content is not None:
            if len(contents) != len(items):
                raise ValueError(f"{len(contents)} contents for {len(items)} items")
            items = [replace(it, content={**(it.content or {}), **self.content.put_many(c)}) if c else it
                     for it, c in zip(items, contents)]
        for modality, vectors in (shadow or {}).items():  # a swap that committed meanwhile takes none: the write
            self.store.put_shadow(modality, vectors)       # below refuses the old version then (store write lock)
        with self._lock:
            self.store.upsert(items)
        return len(items)

    def read_digests(self, digests: list[str]) -> dict[str, bytes]:
        """Kept content by digest (text as UTF-8), without the store lock: Recommend does not wait on it."""
        if self.content is None:
            raise NotFound("no content is kept (store.retain_content is off)")
        return {d: self.content.get(d) for d in dict.fromkeys(digests)}

    def read_content(self, item_id: str, modality: str) -> bytes:
        """The raw content kept for ``item_id``'s ``modality`` (text as UTF-8), e.g. to re-encode it.

        Deleting an item leaves its content kept (shared by hash with other items).

        Raises:
            NotFound: no such item, no content kept for that modality, or no content store.
        """
        with self._lock:
            item = self.store.get([item_id]).get(item_id)
        if item is None:
            raise NotFound(f"item {item_id!r} does not exist")
        digest = (item.content or {}).get(modality)
        if digest is None or self.content is None:
            raise NotFound(f"item {item_id!r} has no {modality} content kept")
        return self.content.get(digest)

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
        """Append events; raises NotFound, recording nothing, when one names an unknown item. Returns how
        many were stored (a repeated (user_id, event_id) is not: MilvusStore.record_interactions)."""
        with self._lock:
            known = self.store.known(sorted({e.item_id for e in events}))
            missing = sorted({e.item_id for e in events} - known)
            if missing:
                raise NotFound(f"interactions name unknown items {missing[:10]}; upsert them first "
                               "(nothing from this batch was recorded)")
            return self.store.record_interactions(events)

    # ----------------------------------------------------------------- recommend

    def recommend(self, q: RecommendQuery, query: dict[str, np.ndarray], model: FusionModel,
                  history_limit: int, query_versions: dict[str, str] | None = None) -> Ranked | None:
        """History -> user vector -> search -> per-modality attribution, with fusion ``model``.

        Args:
            q: who (user_id or history_item_ids), k, filters, exclusions; seen items are left
                out unless ``q.include_seen``.
            query: modality -> (modality_dims[m],) encoded query content; may be empty.
            model: the fusion model the stored fused vectors were made with.
            history_limit: most recent events of ``q.user_id`` to use.
            query_versions: modality -> version of the encoder that made ``query[m]``.
        Returns:
            the ranked candidates, or None when ``model`` is not the one the stored vectors
            were made with (the store was re-indexed meanwhile), or a query vector comes from
            another encoder version than the stored vectors (an encoder swap committed meanwhile).
            With no usable history and no query content, the most popular items that pass the
            filters and exclusions (``Ranked.popular``; see ``popular``).
        Raises:
            InvalidArgument: the model cannot use the request (e.g. an unknown query modality).
        """
        self.sync()
        if self._stale(model, query, query_versions) and (not self.sync(force=True)
                                                          or self._stale(model, query, query_versions)):
            return None
        try:
            return self._recommend(q, query, model, history_limit, query_versions)
        except StoreSwitched:  # a switch (this replica's or another's) landed between the check above and the read
            self.sync(force=True)
            return None
        except (InvalidArgument, ValueError):
            # A switch committed during the call (it does not wait for the engine lock): the model's vectors no
            # longer fit the store's (e.g. "query: expected shape"); the caller refreshes and retries.
            if self._stale(model, query, query_versions):
                return None
            raise

    def _stale(self, model: FusionModel, query: dict[str, np.ndarray], query_versions: dict[str, str] | None) -> bool:
        """Whether the request's model or query encoders are not the stored vectors' ones."""
        stored = self.schema.encoder_versions
        return model.version != self.schema.model_version or any(
            v != stored.get(m, v) for m, v in (query_versions or {}).items() if m in query)

    def _recommend(self, q: RecommendQuery, query: dict[str, np.ndarray], model: FusionModel,
                   history_limit: int, query_versions: dict[str, str] | None = None) -> Ranked:
        with self._lock, self.store.consistent_reads():
            if self._stale(model, query, query_versions):  # a commit on this replica ran since recommend()'s check
                raise StoreSwitched(f"the store switched to {self.schema.model_version} during the call")
            history_ids, history = self._history(q, model.dim, history_limit)
            if not len(history) and not query:
                return self.popular(q.k, q.filters, set(q.exclude_item_ids))
            try:
                user = model.user_vector(history, query)
            except ValueError as err:  # e.g. a query only in modalities this model was not trained on
                raise InvalidArgument(f"fusion model {model.version} cannot use this request: {err}") from None
            exclude = set(q.exclude_item_ids) | (set() if q.include_seen else set(history_ids))
            ranking = self.ranking  # one stage for the whole request
            n = q.k if ranking is None else max(q.k, ranking.candidates_n)
            hits = self.store.search_hits(user, n, q.filters, exclude)  # filters and exclusions hold here
            known = self._ranking_inputs(ranking, hits.item_ids, history_ids) if ranking and len(hits) else {}
        if not len(hits):
            return Ranked([], [], {}, bool(len(history)))
        fused, order = hits.fused, None
        scores = fused @ user
        if ranking is not None:
            lst = CandidateList(user=user, history=history, fused=fused, scores=scores,
                                query_user=query_vector(model, query) if ranking.wants_query else None,
                                attributes=hits.attributes, **known)
            order, scores = ranking.rerank(model, lst, q.k)
            fused = fused[order]
        # contributions: each returned item's retrieval score split per modality (the ranker's score is not)
        return Ranked(hits.candidates(order), scores.tolist(), model.contributions(user, fused), bool(len(history)))

    def _ranking_inputs(self, ranking: RankingStage, item_ids: list[str], history_ids: list[str]) -> dict[str, Any]:
        """What the ranker needs from the store (under the engine lock): popularity, and the history's
        attributes when it matches attributes."""
        out: dict[str, Any] = {"popularity": ranking.popularity(item_ids, self.store.popularity())}
        if ranking.wants_attributes and history_ids:  # attributes only, as popular() reads them
            zero = np.zeros(self.schema.fused_dim, np.float32)
            found = self.store.search(zero, len(set(history_ids)), None, None, only_ids=set(history_ids))
            out["history_attributes"] = [c.attributes for c in found]
        return out

    def popular(self, k: int, filters: list[FilterSpec] | None = None, exclude: set[str] | None = None,
                chunk: int = POPULAR_CHUNK) -> Ranked:
        """The k most interacted-with stored items that pass ``filters`` and are not in ``exclude``;
        if fewer than k ever had an interaction, other matching items fill the list (score 0).

        Scores are each item's share of all recorded interactions, attributed to the part "popularity".
        """
        zero = np.zeros(self.schema.fused_dim, np.float32)
        exclude = set(exclude or ())
        with self._lock:
            ranked = self.store.popularity()
            counts = dict(ranked)
            picked: list[Candidate] = []
            for start in range(0, len(ranked), chunk):  # most popular first, a chunk of ids at a time
                ids = {item_id for item_id, _ in ranked[start:start + chunk]}
                found = self.store.search(zero, len(ids), filters, exclude, only_ids=ids)
                picked += sorted(found, key=lambda c: (-counts[c.item_id], c.item_id))
                if len(picked) >= k:
                    break
            picked = picked[:k]
            if len(picked) < k:
                picked += self.store.search(zero, k - len(picked), filters, exclude | {c.item_id for c in picked})
        total = max(sum(counts.values()), 1)
        scores = np.array([counts.get(c.item_id, 0) / total for c in picked], np.float32)
        return Ranked(picked, scores.tolist(), {"popularity": scores}, used_history=False, popular=True)

    def _history(self, q: RecommendQuery, dim: int, limit: int) -> tuple[list[str], np.ndarray]:
        if q.history_item_ids:
            return self.fused_vectors(q.history_item_ids)
        if q.user_id:
            return self.history_vectors(q.user_id, limit)
        return [], np.zeros((0, dim), np.float32)

    # ----------------------------------------------------------------- encoder swap

    def begin_swap(self, modality: str, version: str, dim: int) -> dict[str, Any]:
        """Start (or resume: same version and dim) collecting ``modality`` vectors of an incoming
        encoder beside the served ones; returns ``swap_status``."""
        # Not under the engine lock: Recommend never reads a shadow, and creating and loading the collection
        # (about 1 s on Lite) runs under the store's write lock, which every shadow write and the commit take.
        resumed = self.store.begin_shadow(modality, version, dim)
        return self.swap_status(modality) | {"resumed": resumed}

    def swaps(self) -> dict[str, str]:
        """Encoder swaps in progress: modality -> the incoming encoder's version (each Gateway asks every
        2 s; read without the engine lock: a shadow's state is one property, written atomically)."""
        states = {m: self.store.shadow(m).state() for m in self.schema.modality_dims}
        return {m: s["version"] for m, s in states.items() if s and not s["committed"]}

    def swap_status(self, modality: str) -> dict[str, Any]:
        """The swap in progress: incoming version, items holding ``modality``, those with a shadow
        vector, and those that cannot be re-encoded (no content kept)."""
        state, have = self.store.shadow_ids(modality)
        # Ids and digests only, without the engine lock: Recommend must not wait for the scans (retrieval/swap.py).
        holding = self.store.swap_holding(modality)
        return {"modality": modality, "version": state and state["version"], "items": len(holding),
                "done": sum(i in have for i in holding),
                "without_content": sorted(i for i, digest in holding.items() if not digest and i not in have)}

    def swap_todo(self, modality: str) -> dict[str, str]:
        """Items holding ``modality`` with content kept and no shadow vector yet: id -> content digest
        (``read_digests`` then reads the content without touching the store)."""
        have = self.store.shadow_ids(modality)[1]
        return {i: digest for i, digest in self.store.swap_holding(modality).items() if digest and i not in have}

    def put_shadow(self, modality: str, vectors: dict[str, np.ndarray]) -> int:
        """Store incoming-encoder vectors of ``modality`` by item id ((dim,) each); raises
        FailedPrecondition when no swap of ``modality`` is filling (none, or it committed). Under the store's
        write lock only (MilvusStore.put_shadow): Recommend does not wait for the write."""
        if not self.store.put_shadow(modality, vectors):
            raise FailedPrecondition(f"no {modality} encoder swap is filling shadow vectors")
        return len(vectors)

    def commit_swap(self, modality: str, model: FusionModel, batch_size: int = COMMIT_BATCH_ITEMS,
                    busy_share: float = 1.0) -> int:
        """Serve the shadow vectors: fused vectors recomputed with ``model`` (made for the incoming
        encoder), switched atomically; the incoming version becomes the store's (MilvusStore.commit_swap,
        ``busy_share`` there)."""
        state = self.store.shadow(modality).state()
        if state is None:
            raise NotFound(f"no {modality} encoder swap in progress")
        new_schema = replace(self.schema, encoder_versions={**self.schema.encoder_versions, modality: state["version"]},
                             fused_dim=model.dim, model_version=model.version)

        def fused_for(batch: list[StoredItem]) -> np.ndarray:
            return model.item_vectors([b.modality_vectors for b in batch], [b.item_id for b in batch])

        return self.store.commit_swap(modality, new_schema, fused_for, batch_size, busy_share)

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

    # ----------------------------------------------------------------- training

    def training_snapshot(self, batch_size: int = 1000, swapping: str | None = None) -> dict[str, Any]:
        """Every item's per-modality vectors and every recorded interaction, for training the fusion
        model on the store (``fusionrec train --from-store``; fusionrec.fusion.train.from_store).

        With ``swapping`` (a modality whose encoder swap is filling), that modality's vectors and
        version are the incoming encoder's (shadow vectors): the model is refitted for the new space.

        Returns:
            ``item_ids`` (n,); ``vectors`` modality -> (n, dim_m) float32 (zero rows where absent);
            ``present`` modality -> (n,) bool; ``events`` (user_id, item_id, timestamp_s) ordered by
            user, then time; ``modality_dims``, ``encoder_versions`` and ``model_version`` of the store.
        """
        with self._lock:
            schema = self.schema
            item_ids: list[str] = []
            vectors: dict[str, list[np.ndarray]] = {m: [] for m in schema.modality_dims}
            for batch in self.store.iter_items(batch_size):
                for item in batch:
                    item_ids.append(item.item_id)
                    for m, rows in vectors.items():
                        rows.append(item.modality_vectors.get(m))
            events = [(e.user_id, e.item_id, e.timestamp_s) for e in self.store.interactions()]
            versions = dict(schema.encoder_versions)
            if swapping is not None:
                versions[swapping] = self._shadow_rows(swapping, item_ids, vectors[swapping])
        present = {m: np.array([v is not None for v in rows], dtype=bool) for m, rows in vectors.items()}
        matrices = {m: np.stack([np.zeros(schema.modality_dims[m], np.float32) if v is None else v for v in rows])
                    if rows else np.zeros((0, schema.modality_dims[m]), np.float32) for m, rows in vectors.items()}
        return {"item_ids": item_ids, "vectors": matrices, "present": present, "events": events,
                "modality_dims": dict(schema.modality_dims), "encoder_versions": versions,
                "model_version": schema.model_version}

    def _shadow_rows(self, modality: str, item_ids: list[str], rows: list[np.ndarray | None]) -> str:
        """Replace ``rows`` (per item id) by their shadow vectors; returns the incoming version."""
        shadow = self.store.shadow(modality)
        state = shadow.state()
        if state is None:
            raise NotFound(f"no {modality} encoder swap in progress")
        found = shadow.fetch([i for i, v in zip(item_ids, rows) if v is not None])
        for k, item_id in enumerate(item_ids):
            if rows[k] is not None:
                rows[k] = found.get(item_id)  # an item not re-encoded yet counts as lacking the modality
        return state["version"]
