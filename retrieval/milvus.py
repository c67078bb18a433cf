"""MilvusStore: the ItemStore on Milvus (Lite file or server), searched in memory or in Milvus.

``MilvusStore(uri, schema)``: ``uri`` is a Milvus Lite data path ending in ``.db`` (embedded,
in-process) or a server URI such as ``http://host:19530``. Milvus holds everything durably
(layout in layout.py, Lite's behaviour in lite.py).

On Lite the store is the data's one owner: with ``search_backend="memory"`` (the default there)
searches run on an ItemMirror (faiss HNSW + attribute columns) filled from the items collection
at open and kept in step on every write (Milvus Lite 3.2.2 pays 50-90 ms per search at 100k rows
whatever the index); ``"milvus"`` searches Milvus. On a server, any number of stores (Retrieval
replicas) share the data: searches, filters and history are read from the server on every call
(at ``ServerOptions.consistency_level``: Strong = read-your-writes across replicas), the items
are read through an alias that a re-index moves for every replica at once, and writes are fenced
against another replica's rebuild (server_items.py). No in-memory index there.

The store is the items side (writes, reads, search dispatch, the re-index switch) over
collaborators with one job each: connection.py (client, flush policy, chunked calls),
item_collections.py (open and check the items collections), server_items.py (the same on a
server: alias, fence, switch), modality_vectors.py (where per-modality vectors live), rows.py
(items <-> rows), search.py (both search backends), reindex.py (building the re-indexed
collection) and interactions.py (events, history, popularity).

Measured through this store (5k items, fused 128-d, text 384 + image 1280 + audio 128-d,
2 shared cores, noisy): bulk upsert ~1.4k items/s (items rows alone ~9.8k rows/s; the
1792 floats per modality row dominate); flushing 5k pending items 2.2 s; one-item
upsert 2.8 ms without a flush, 3.7 ms at the default threshold, 32 ms when flushing every
write; Milvus-side search top-20 ~7-15 ms p50 unfiltered and ~25-35 ms with an equality +
range filter (flushed), ~100 ms unfiltered with 5k rows unflushed.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from fusionrec.core.rules import as_vector, check_id, storable_id
from fusionrec.retrieval.base import (
    Candidate,
    FilterSpec,
    Hits,
    InteractionEvent,
    ItemStore,
    StoredItem,
    StoreSchema,
    StoreSwitched,
)
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.expressions import id_list
from fusionrec.retrieval.history import HistoryCache
from fusionrec.retrieval.interactions import InteractionLog
from fusionrec.retrieval.item_collections import CollectionNames, has_field, open_items
from fusionrec.retrieval.layout import (
    F_CONTENT,
    F_FUSED,
    F_ID,
    F_MODEL_VERSION,
    F_PK,
    MILVUS_MAX_TOPK,
    PROP_ACTIVE_ITEMS,
    QUERY_CHUNK,
    vec_out,
)
from fusionrec.retrieval.mirror import ItemMirror
from fusionrec.retrieval.modality_vectors import PackedVectors, SplitVectors
from fusionrec.retrieval.reindex import ReindexFn, build_items, check_reindex_schema, next_items_name
from fusionrec.retrieval.rows import ItemRows, attrs_from_row
from fusionrec.retrieval.schema_meta import validate_schema
from fusionrec.retrieval.search import load_mirror, resolve_backend, search_milvus, search_mirror
from fusionrec.retrieval.server_items import ServerItems, ServerOptions
from fusionrec.retrieval.swap import EncoderSwaps
from fusionrec.retrieval.upsert_journal import UpsertJournal

logger = logging.getLogger(__name__)


class MilvusStore(EncoderSwaps, ItemStore):
    """Items + interactions in Milvus (Lite file or server). Thread-safe.

    Extra keyword-only knobs (defaults are fine):
      history_cache_events_per_user: most recent events kept per cached user.
      flush_every_rows: flush a collection after this many written rows; None = auto
        (on Lite 512 when Milvus serves searches, 8192 when the in-memory index does;
        never on a server), 0 = never, 1 = after every write.
      search_backend: "memory" (in-memory HNSW + attribute columns kept in step with
        Milvus; Lite only), "milvus" (search Milvus itself) or "auto" (memory on Lite,
        milvus on a server).
      index_params: VectorIndex knobs for the memory backend (m, ef_construction,
        ef_search, ef_max, exact_max_rows); None = defaults.
      accept_stored_model: when only the fused space (model version / fused dim) differs
        from ``schema``, open with the stored one instead of raising, so the caller can
        re-index (``self.schema`` is then the stored one).
      server: how replicas share a server (server_items.ServerOptions); ignored on Lite.
    """

    def __init__(
        self,
        uri: str,
        schema: StoreSchema,
        items_collection: str = "items",
        interactions_collection: str = "interactions",
        token: str = "",
        history_cache_users: int = 100_000,
        *,
        history_cache_events_per_user: int = 1000,
        flush_every_rows: int | None = None,
        search_backend: str = "auto",
        index_params: dict[str, Any] | None = None,
        accept_stored_model: bool = False,
        server: ServerOptions | None = None,
    ) -> None:
        validate_schema(schema)
        names = CollectionNames(items_collection, interactions_collection).check()
        search_backend = resolve_backend(search_backend, uri)
        options = server or ServerOptions()

        self.schema = schema
        self.uri = uri
        self.items_collection = items_collection  # the name users configure
        self.mvec_collection = names.mvec
        self.interactions_collection = interactions_collection
        self.search_backend = search_backend
        self._names = names
        self._index_params = dict(index_params or {})
        self._lock = threading.RLock()  # guards the switch of the active items collection
        self._write_lock = threading.RLock()  # keeps Milvus and the mirror in the same order
        self._mirror: ItemMirror | None = None
        self._server: ServerItems | None = None
        self._vectors: PackedVectors | SplitVectors | None = None
        self._journal: UpsertJournal | None = None  # Lite: upserts under way (upsert_journal.py)
        self._conn = MilvusConnection(uri, token, flush_every_rows, mirrored=search_backend == "memory",
                                      consistency_level=options.consistency_level)
        try:
            if self._conn.is_lite:
                content_field = self._open_lite(schema, accept_stored_model)
                history = HistoryCache(history_cache_users, history_cache_events_per_user)
            else:
                content_field, history = self._open_server(schema, accept_stored_model, options), None
            self._rows = ItemRows(self.schema, content_field)
            self._finish_pending()  # an upsert a crash interrupted, before anything reads the items
            if not self._rows.content_field:
                logger.warning("store %s predates content retention: kept content is not recorded per item "
                               "(re-ingest into a new store to record it)", self._conn.where)
            self._log = InteractionLog(self._conn, interactions_collection, history, options.popularity_ttl_s)
            self._log.open()
            self._conn.wait_loaded()
            if search_backend == "memory":
                self._mirror = load_mirror(self._conn, self._items, self.schema.fused_dim, self._index_params)
            self._resume_swaps()
        except BaseException:
            self.close()
            raise

    def _open_lite(self, schema: StoreSchema, accept_stored_model: bool) -> bool:
        """The items collections of a Lite file; returns whether they record kept content."""
        # the collection holding the items now (see reindex), and what it holds
        self._items, self.schema = open_items(self._conn, self._names, schema, accept_stored_model)
        self._vectors = PackedVectors(self._conn, self._names.mvec)
        self._journal = UpsertJournal(self._conn.where)
        return has_field(self._conn, self._names.mvec, F_CONTENT)

    def _open_server(self, schema: StoreSchema, accept_stored_model: bool, options: ServerOptions) -> bool:
        """The items collections on a server, shared with other replicas (server_items.py)."""
        self._server = ServerItems(self._conn, self._names, options)
        self.schema = self._server.open(schema, accept_stored_model)
        self._items = self.items_collection  # the alias: every read follows a switch
        self._vectors = SplitVectors(self._conn, self.items_collection, self.schema)
        self._vectors.open()
        return True

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        with self._lock:
            self._mirror = None
        if self._server is not None:
            self._server.close()
        if isinstance(self._vectors, SplitVectors):
            self._vectors.close()
        if self._conn is not None:
            self._conn.close()

    @property
    def shared(self) -> bool:
        """On a server: other stores (replicas) may write the same data at the same time."""
        return self._server is not None

    def sync(self, force: bool = False) -> bool:
        """Follow a switch another replica made (re-index, encoder swap): on a server, at most
        ``state_ttl_s`` late, at once with ``force``. Returns whether the schema changed."""
        if self._server is None:
            return False
        schema = self._server.refresh(force)
        if schema is None:
            return False
        with self._lock:
            self.schema, self._rows = schema, ItemRows(schema, self._rows.content_field)
        return True

    def __enter__(self) -> "MilvusStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """Flush every collection now (Lite: moves memtable rows into segments)."""
        items = self._server.target if self._server is not None else self._items
        self._conn.flush([*self._vectors.collections, items, *self._log.collections])

    # ----------------------------------------------------------------- writes

    def upsert(self, items: list[StoredItem]) -> None:
        if not items:
            return
        if self._server is not None:
            with self._write_lock:
                self._server.fenced(lambda target: self._write_rows(target, *self._rows.prepare_batch(items)),
                                    lambda: self.sync(force=True))
            return
        irows, mrows = self._rows.prepare_batch(items)
        with self._write_lock:
            self._finish_pending()
            self._journal.write(irows, mrows, self._write_lite)

    def _write_lite(self, irows: list[dict], mrows: list[dict]) -> None:
        """Both collections, then the in-memory index (caller holds the write lock)."""
        self._write_rows(self._items, irows, mrows)
        if self._mirror is not None:
            self._mirror.upsert([r[F_ID] for r in irows], np.stack([r[F_FUSED] for r in irows]),
                                [attrs_from_row(r) for r in irows])
        self._vectors.after_write(len(irows))
        self._conn.after_write(self._items, len(irows))

    def _finish_pending(self) -> None:
        """Lite: write again every upsert a failure or crash cut short (upsert_journal.py), under the write lock."""
        if self._journal is not None:
            self._journal.finish(self.schema.model_version, self._write_lite)

    def _write_rows(self, items: str, irows: list[dict], mrows: list[dict]) -> None:
        # modality vectors first, so a searchable item always has its vectors
        self._vectors.write(mrows, self._rows.mvec_row_bytes)
        self._conn.write(items, irows, self._rows.item_row_bytes)

    def delete(self, item_ids: list[str]) -> list[str]:
        ids = list(dict.fromkeys(check_id(i) for i in item_ids))
        if not ids:
            return []
        gone: list[str] = []

        def delete_from(items: str) -> None:
            found = self._delete_rows(items, ids)  # a fenced retry may find none of what a first try deleted
            gone[:] = [i for i in ids if i in found or i in gone]

        with self._write_lock:
            if self._server is not None:
                self._server.fenced(delete_from, lambda: self.sync(force=True))
                return gone
            self._finish_pending()  # else an unfinished upsert, finished later, would bring items back
            delete_from(self._items)
            if self._mirror is not None:
                self._mirror.delete(gone)
        self._conn.after_write(self._items, len(gone))
        self._vectors.after_write(len(gone))
        return gone

    def _delete_rows(self, items: str, ids: list[str]) -> list[str]:
        existing = self._conn.fetch(items, ids, [F_ID])
        gone = [i for i in ids if i in existing]
        for i in range(0, len(gone), QUERY_CHUNK):
            expr = f"{F_ID} in {id_list(gone[i : i + QUERY_CHUNK])}"
            self._conn.client.delete(items, filter=expr)
            self._vectors.delete(expr)
        return gone

    # ----------------------------------------------------------------- reads

    def get(self, item_ids: list[str]) -> dict[str, StoredItem]:
        ids = list(dict.fromkeys(check_id(i) for i in item_ids))
        if not ids:
            return {}
        if isinstance(self._vectors, SplitVectors):  # a server: items and vectors read concurrently
            pending = self._vectors.pool.submit(self._conn.fetch, self._items, ids)
            mrows = self._vectors.fetch(ids)
            return self._rows.assemble(pending.result(), mrows)
        irows = self._conn.fetch(self._items, ids)
        mrows = self._vectors.fetch(list(irows)) if irows else {}
        return self._rows.assemble(irows, mrows)

    @contextmanager
    def consistent_reads(self) -> Iterator[None]:
        """Reads of items and interactions in this block (this thread) see every write acknowledged
        before it, by any replica, for one wait on the server instead of one per read
        (MilvusConnection.caught_up); a no-op on Lite and below Strong consistency."""
        with self._conn.caught_up({self._items: f'{F_ID} == ""', self.interactions_collection: f"{F_PK} == -1",
                                   self._log.keyed: f'{F_ID} == ""'}):
            yield

    def fused(self, item_ids: list[str]) -> dict[str, np.ndarray]:
        """Fused vectors by id; on a server StoreSwitched when they are another model's than ``schema``'s."""
        mirror = self._mirror
        if mirror is not None:
            return mirror.fused([i for i in item_ids if isinstance(i, str)])
        if self._server is None:
            return super().fused(item_ids)
        ids = list(dict.fromkeys(i for i in item_ids if isinstance(i, str) and storable_id(i)))
        rows = self._conn.fetch(self._items, ids, [F_ID, F_FUSED, F_MODEL_VERSION]) if ids else {}
        version = self.schema.model_version
        if any(r.get(F_MODEL_VERSION) != version for r in rows.values()):
            raise StoreSwitched(f"stored fused vectors are no longer of model {version!r}: the store switched")
        return {i: vec_out(r[F_FUSED]) for i, r in rows.items()}

    def known(self, item_ids: list[str]) -> set[str]:
        """The stored ones among ``item_ids``."""
        if self._server is None:
            return set(self.fused(list(item_ids)))
        ids = list(dict.fromkeys(i for i in item_ids if isinstance(i, str) and storable_id(i)))
        return set(self._conn.fetch(self._items, ids, [F_ID])) if ids else set()

    def _search_args(self, query: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """(query as a (fused_dim,) vector, k); ValueError beyond Milvus' top-k limit."""
        q, k = as_vector(query, self.schema.fused_dim, "query"), int(k)
        if k > MILVUS_MAX_TOPK:
            raise ValueError(f"k={k} exceeds Milvus' top-k limit of {MILVUS_MAX_TOPK}")
        return q, k

    def search_hits(self, query: np.ndarray, k: int, filters: list[FilterSpec] | None = None,
                    exclude_ids: set[str] | None = None) -> Hits:
        if self._mirror is None:  # Milvus answers rows: search() builds them
            return super().search_hits(query, k, filters, exclude_ids)
        q, k = self._search_args(query, k)
        if k <= 0:
            return Hits.of([], self.schema.fused_dim)
        return search_mirror(self._mirror, q, k, filters, set(exclude_ids or ()))

    def search(
        self,
        query: np.ndarray,
        k: int,
        filters: list[FilterSpec] | None = None,
        exclude_ids: set[str] | None = None,
        only_ids: set[str] | None = None,
    ) -> list[Candidate]:
        q, k = self._search_args(query, k)
        if k <= 0:
            return []
        excluded = set(exclude_ids or ())
        mirror = self._mirror
        if mirror is not None:
            return search_mirror(mirror, q, k, filters, excluded, only_ids).candidates()
        if self._server is None:
            return search_milvus(self._conn, self._items, q, k, filters, excluded, only_ids)
        try:
            return search_milvus(self._conn, self._items, q, k, filters, excluded, only_ids, self.schema.model_version)
        except (ValueError, StoreSwitched):
            raise
        except Exception:  # e.g. another fused dim: the alias moved to another model's vectors
            if self.sync(force=True):
                raise StoreSwitched("the store switched to another fusion model during the search") from None
            raise

    def count(self) -> int:
        return self._conn.count(self._items)

    def memory_bytes(self) -> int:
        """Approximate bytes held by the in-memory search mirror (0 with search_backend="milvus")."""
        mirror = self._mirror
        return mirror.memory_bytes() if mirror is not None else 0

    def iter_items(self, batch_size: int = 1000) -> Iterator[list[StoredItem]]:
        """Every item in batches, from the items collection live when the iteration starts."""
        batch_size = max(1, min(int(batch_size), MILVUS_MAX_TOPK))
        self.sync()
        items = self._server.target if self._server is not None else self._items
        for batch in self._conn.iterate(items, batch_size, ["*"]):
            irows = {r[F_ID]: r for r in batch}
            mrows = self._vectors.fetch(list(irows))
            assembled = self._rows.assemble(irows, mrows)
            yield [assembled[r[F_ID]] for r in batch if r[F_ID] in assembled]

    # ----------------------------------------------------------------- re-indexing

    def reindex(self, new_schema: StoreSchema, fn: ReindexFn, batch_size: int = 1000) -> int:
        """Recompute every item's fused vector with ``fn`` and switch to them atomically.

        Args:
            new_schema: the schema after re-indexing; its modalities, their dims and encoder
                versions must equal the current ones (only fused_dim/model_version change).
            fn: a batch of StoredItem (modality vectors, attributes, old fused vector) ->
                (len(batch), new_schema.fused_dim) float32 vectors.
            batch_size: items per fn call.

        Returns the number of items re-indexed. The new vectors go into a new items
        collection; on Lite the name of the active one is committed to the modality-vectors
        collection's properties (Lite has no aliases), then the old one is dropped. On a server
        the alias moves (every replica reads the new collection from then on), under the lock
        every replica's rebuilds share; a replica that finds the store already at ``new_schema``
        does nothing (returns 0). Readers see the old vectors until the commit and the new ones
        after. Writes wait until it returns (on a server, those of every replica: they are
        fenced); on error the store is unchanged (the half-built collection is dropped).
        """
        check_reindex_schema(self.schema, new_schema)
        batch_size = max(1, min(int(batch_size), MILVUS_MAX_TOPK))
        with self._write_lock, self._rebuilding("reindex"):
            if self._server is not None and (self.schema.model_version, self.schema.fused_dim) == (
                    new_schema.model_version, new_schema.fused_dim):
                return 0  # another replica re-indexed to it meanwhile
            check_reindex_schema(self.schema, new_schema)
            return self._rebuild(new_schema, self.iter_items(batch_size), fn)

    @contextmanager
    def _rebuilding(self, what: str) -> Iterator[None]:
        """On a server: hold the lock shared by every replica, up to date with the alias (caller holds the
        write lock)."""
        if self._server is None:
            self._finish_pending()  # the rebuild copies the items: complete ones only
            yield
            return
        with self._server.rebuilding(what):
            self.sync(force=True)
            yield

    def _rebuild(self, new_schema: StoreSchema, batches: Iterator[list[StoredItem]], fn: ReindexFn) -> int:
        """A new items collection from ``batches`` with ``fn``'s fused vectors, then the atomic switch to
        it and ``new_schema`` (caller holds the write lock, and on a server the rebuild lock)."""
        rows = ItemRows(new_schema, self._rows.content_field)
        old = self._server.target if self._server is not None else self._items
        new = next_items_name(self.items_collection, old)
        mirror = ItemMirror(new_schema.fused_dim, **self._index_params) if self._mirror is not None else None
        n = build_items(self._conn, new, rows, batches, fn, mirror)
        if self._server is not None:
            self._server.switch(new, new_schema)  # the commit point: the alias moves for every replica
            with self._lock:
                self.schema, self._rows = new_schema, rows
            return n
        # the commit point: one property write names the active collection
        self._conn.client.alter_collection_properties(self.mvec_collection, {PROP_ACTIVE_ITEMS: new})
        with self._lock:
            self._items, self.schema, self._rows = new, new_schema, rows
            self._mirror = mirror
        self._conn.forget_pending(old)
        try:
            self._conn.client.drop_collection(old)
        except Exception:  # pragma: no cover - the switch already happened
            logger.exception("could not drop the replaced items collection %r", old)
        return n

    # ----------------------------------------------------------------- interactions

    def record_interactions(self, events: list[InteractionEvent]) -> int:
        """Store events; returns how many were new (InteractionLog.record: a repeated event id is skipped)."""
        return self._log.record(events)

    def history(self, user_id: str, limit: int) -> list[InteractionEvent]:
        return self._log.history(user_id, limit)

    def interactions(self) -> list[InteractionEvent]:
        """Every recorded interaction, ordered by (user, time)."""
        return self._log.events()

    def popularity(self) -> list[tuple[str, int]]:
        return self._log.popularity()
