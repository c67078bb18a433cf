"""MilvusStore: the ItemStore on Milvus (Lite file or server), searched in memory or in Milvus.

``MilvusStore(uri, schema)``: ``uri`` is a Milvus Lite data path ending in ``.db`` (embedded,
in-process) or a server URI such as ``http://host:19530``. Milvus holds everything durably
(layout in layout.py, Lite's behaviour in lite.py). With ``search_backend="memory"`` (the
default) searches run on an ItemMirror (faiss HNSW + attribute columns) filled from the
items collection at open and kept in step on every write: Milvus Lite 3.2.2 pays 50-90 ms
per search at 100k rows whatever the index. ``search_backend="milvus"`` searches Milvus.

Measured through this store (5k items, fused 128-d, text 384 + image 1280 + audio 128-d,
2 shared cores, noisy): bulk upsert ~1.4k items/s (items rows alone ~9.8k rows/s; the
1792 floats per modality row dominate); flushing 5k pending items 2.2 s; one-item
upsert 2.8 ms without a flush, 3.7 ms at the default threshold, 32 ms when flushing every
write; Milvus-side search top-20 ~7-15 ms p50 unfiltered and ~25-35 ms with an equality +
range filter (flushed), ~100 ms unfiltered with 5k rows unflushed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import replace
from typing import Any, Callable, Iterator

import numpy as np

from fusionrec.retrieval import lite
from fusionrec.retrieval.base import (
    AttributeValue,
    Candidate,
    FilterSpec,
    InteractionEvent,
    ItemStore,
    SchemaMismatch,
    StoredItem,
    StoreSchema,
)
from fusionrec.retrieval.expressions import attr_field, build_filter, filter_clause, id_list, quote_string
from fusionrec.retrieval.history import HistoryCache
from fusionrec.retrieval.layout import (
    ATTR_PREFIX,
    DUMMY_DIM,
    F_DUMMY,
    F_FUSED,
    F_ID,
    F_ITEM,
    F_KIND,
    F_MODALITIES,
    F_MODEL_VERSION,
    F_MVEC_DUMMY,
    F_PK,
    F_TS,
    F_USER,
    F_VERSIONS,
    FLUSH_EVERY_ROWS_LITE,
    FLUSH_EVERY_ROWS_LITE_MIRRORED,
    ID_MAX_BYTES,
    INDEX_PARAMS,
    KIND_MAX_BYTES,
    MAX_WRITE_BYTES,
    MILVUS_MAX_TOPK,
    MVEC_SUFFIX,
    PROP_ACTIVE_ITEMS,
    PROP_FORMAT,
    PROP_ROLE,
    PROP_SCHEMA,
    QUERY_CHUNK,
    STORE_FORMAT,
    VEC_PREFIX,
    interactions_schema,
    items_schema,
    modality_vectors_schema,
    search_params,
)
from fusionrec.retrieval.mirror import ItemMirror
from fusionrec.retrieval.schema_meta import (
    modality_differences,
    schema_differences,
    schema_from_json,
    schema_to_json,
    validate_schema,
)
from fusionrec.core.rules import as_vector, check_attr_value, check_id, check_kind, storable_id
from fusionrec.retrieval.layout import vec_out

logger = logging.getLogger(__name__)

_COLLECTION_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
_REINDEX_SEP = "__r"  # re-indexed items collections are named <items>__r<n>
SEARCH_BACKENDS = ("memory", "milvus")
MIRROR_LOAD_BATCH = 4096

#: fn of ``reindex``: a batch of stored items -> (n, new fused_dim) float32 vectors
ReindexFn = Callable[[list[StoredItem]], np.ndarray]


class MilvusStore(ItemStore):
    """Items + interactions in Milvus (Lite file or server). Thread-safe.

    Extra keyword-only knobs (defaults are fine):
      history_cache_events_per_user: most recent events kept per cached user.
      flush_every_rows: flush a collection after this many written rows; None = auto
        (on Lite 512 when Milvus serves searches, 8192 when the in-memory index does;
        never on a server), 0 = never, 1 = after every write.
      search_backend: "memory" (in-memory HNSW + attribute columns kept in step with
        Milvus) or "milvus" (search Milvus itself).
      index_params: VectorIndex knobs for the memory backend (m, ef_construction,
        ef_search, ef_max, exact_max_rows); None = defaults.
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
        search_backend: str = "memory",
        index_params: dict[str, Any] | None = None,
        accept_stored_model: bool = False,
    ) -> None:
        validate_schema(schema)
        # True: when only the fused space (model version / fused dim) differs from `schema`,
        # open with the stored one instead of raising, so the caller can re-index.
        self._accept_stored_model = accept_stored_model
        for name in (items_collection, interactions_collection):
            if not isinstance(name, str) or _COLLECTION_RE.fullmatch(name) is None:
                raise ValueError(f"invalid collection name {name!r}")
        if items_collection == interactions_collection:
            raise ValueError("items and interactions collections must differ")
        if _REINDEX_SEP in items_collection:
            raise ValueError(f"items collection name must not contain {_REINDEX_SEP!r}")
        if search_backend not in SEARCH_BACKENDS:
            raise ValueError(f"search_backend must be one of {SEARCH_BACKENDS}, got {search_backend!r}")
        history = HistoryCache(history_cache_users, history_cache_events_per_user)

        self.schema = schema
        self.uri = uri
        self.items_collection = items_collection  # the name users configure
        self._items = items_collection  # the collection holding the items now (see reindex)
        self.mvec_collection = items_collection + MVEC_SUFFIX
        self.interactions_collection = interactions_collection
        if self.mvec_collection == interactions_collection:
            raise ValueError(f"collection name {interactions_collection!r} is reserved")
        self.search_backend = search_backend
        self._index_params = dict(index_params or {})
        self._modalities = sorted(schema.modality_dims)
        self._lock = threading.RLock()
        self._write_lock = threading.RLock()  # keeps Milvus and the mirror in the same order
        self._closed = False
        self._lite_path: str | None = None
        self._client = None
        self._mirror: ItemMirror | None = None

        self._is_lite = uri.endswith(".db")
        self._backend = "lite" if self._is_lite else "server"
        if flush_every_rows is None:  # see lite.py: unflushed rows slow Lite's own search, not reads by id
            flush_every_rows = 0 if not self._is_lite else (
                FLUSH_EVERY_ROWS_LITE_MIRRORED if search_backend == "memory" else FLUSH_EVERY_ROWS_LITE)
        self._flush_every = int(flush_every_rows)
        self._pending: dict[str, int] = {}
        self._history = history

        try:
            self._connect(uri, token)
            self._open_items()
            self._open_interactions()
            self._load_history()
            if search_backend == "memory":
                self._mirror = self._load_mirror(self._items, schema.fused_dim)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- connection

    def _connect(self, uri: str, token: str) -> None:
        from pymilvus import MilvusClient

        if self._is_lite:
            path = os.path.abspath(uri)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            lite.install_log_filter()
            lite.acquire(path)
            self._lite_path = path
            try:
                self._client = MilvusClient(uri=path)
            except Exception as e:
                raise RuntimeError(
                    f"could not open Milvus Lite data at {path}: {e}. A Lite data dir can be "
                    "opened by one process at a time; to share it, run `milvus-lite server "
                    "--data-dir <dir> --port <port>` and use http://127.0.0.1:<port> as the URI."
                ) from e
        else:
            self._client = MilvusClient(uri=uri, token=token)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, self._client = self._client, None
            self._mirror = None
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - best effort
                logger.exception("closing the Milvus client failed")
        if self._lite_path is not None:
            path, self._lite_path = self._lite_path, None
            lite.release(path)

    def __enter__(self) -> "MilvusStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - safety net only
        try:
            if not self._closed and self._lite_path is not None:
                self.close()
        except Exception:
            pass

    @property
    def _c(self):
        if self._closed or self._client is None:
            raise RuntimeError("MilvusStore is closed")
        return self._client

    def _consistency(self) -> dict[str, Any]:
        # Lite is always read-your-writes; on a server ask for it explicitly.
        return {} if self._is_lite else {"consistency_level": "Strong"}

    # ----------------------------------------------------------------- collections

    def _index_params_for(self, fields: list[tuple[str, str]]):
        ip = self._c.prepare_index_params()
        for field_name, role in fields:
            p = INDEX_PARAMS[self._backend][role]
            ip.add_index(
                field_name=field_name,
                index_type=p["index_type"],
                metric_type=p["metric_type"],
                params=dict(p["params"]),
            )
        return ip

    def _create(self, name: str, built, properties: dict[str, str]) -> None:
        schema, idx = built
        kwargs = {} if self._is_lite else {"consistency_level": "Strong"}
        self._c.create_collection(collection_name=name, schema=schema, properties=properties, **kwargs)
        # sync=False: pymilvus' index wait loop sleeps 0.5 s per index even on an empty
        # collection; the index exists (and Lite builds it) as soon as the call returns.
        self._c.create_index(name, self._index_params_for(idx), sync=False)

    def _items_properties(self, schema: StoreSchema) -> dict[str, str]:
        return {PROP_FORMAT: STORE_FORMAT, PROP_ROLE: "items", PROP_SCHEMA: schema_to_json(schema)}

    def _where(self) -> str:
        return self._lite_path or self.uri

    def _mismatch_advice(self, diffs_modalities: bool = True) -> str:
        reindex = (
            ""
            if diffs_modalities
            else " Only the fusion model differs: re-index the fused vectors from the stored "
            "modality vectors with MilvusStore.reindex (opened with the stored configuration)."
        )
        return (
            f"Mixing them would silently return wrong neighbours. Either open the store with "
            f"another items collection name (e.g. items_collection="
            f"'{self.items_collection}_v2') and re-ingest the catalog with the configured "
            f"encoders/model, or drop collections '{self._items}' and "
            f"'{self.mvec_collection}' and re-ingest; to keep serving the stored data, "
            f"configure the stored versions instead.{reindex}"
        )

    def _active_items(self) -> str:
        """The items collection named in the modality-vectors properties, else the configured one."""
        c = self._c
        if c.has_collection(self.mvec_collection):
            props = c.describe_collection(self.mvec_collection).get("properties") or {}
            return props.get(PROP_ACTIVE_ITEMS) or self.items_collection
        return self.items_collection

    def _open_items(self) -> None:
        c = self._c
        self._items = self._active_items()
        has_items = c.has_collection(self._items)
        has_mvec = c.has_collection(self.mvec_collection)
        if not has_items:
            if has_mvec:
                logger.warning(
                    "dropping orphaned collection %r (its items collection %r is missing)",
                    self.mvec_collection,
                    self._items,
                )
                c.drop_collection(self.mvec_collection)
                self._items = self.items_collection
            # modality vectors first: the items collection (holding the schema) commits it.
            self._create(
                self.mvec_collection,
                modality_vectors_schema(self.schema.modality_dims),
                {PROP_FORMAT: STORE_FORMAT, PROP_ROLE: "modality_vectors"},
            )
            self._create(self._items, items_schema(self.schema.fused_dim), self._items_properties(self.schema))
        else:
            desc = c.describe_collection(self._items)
            props = desc.get("properties") or {}
            raw = props.get(PROP_SCHEMA)
            if raw is None or props.get(PROP_ROLE) != "items":
                raise SchemaMismatch(
                    f"Milvus collection '{self._items}' at {self._where()} exists but "
                    f"is not a fusionrec items collection (no '{PROP_SCHEMA}' property). "
                    f"Use another items_collection name, or drop that collection."
                )
            try:
                stored = schema_from_json(raw)
            except (ValueError, KeyError, TypeError) as e:
                raise SchemaMismatch(
                    f"Milvus collection '{self._items}' at {self._where()} has an "
                    f"unreadable stored schema ({e}). Use another items_collection name or "
                    f"drop and re-ingest."
                ) from e
            if self._accept_stored_model and not modality_differences(stored, self.schema):
                # Only the fused space differs: open as stored; the owner re-indexes (see reindex).
                self.schema = replace(self.schema, fused_dim=stored.fused_dim, model_version=stored.model_version)
            diffs = schema_differences(stored, self.schema)
            if diffs:
                raise SchemaMismatch(
                    f"Milvus collection '{self._items}' at {self._where()} holds "
                    f"vectors written with another encoder/model configuration than this one:\n"
                    + "".join(f"  - {d}\n" for d in diffs)
                    + self._mismatch_advice(bool(modality_differences(stored, self.schema)))
                )
            if not has_mvec:
                raise SchemaMismatch(
                    f"Milvus collection '{self.mvec_collection}' (per-modality vectors of "
                    f"'{self._items}') is missing at {self._where()}: the store is "
                    f"incomplete. Drop '{self._items}' and re-ingest."
                )
            self._check_fields(self._items, desc, {F_FUSED: self.schema.fused_dim})
            self._check_fields(
                self.mvec_collection,
                c.describe_collection(self.mvec_collection),
                {VEC_PREFIX + m: d for m, d in self.schema.modality_dims.items()},
            )
        c.load_collection(self.mvec_collection)
        c.load_collection(self._items)

    def _check_fields(self, name: str, desc: dict, expected_dims: dict[str, int]) -> None:
        dims = {}
        for f in desc.get("fields", []):
            params = f.get("params") or {}
            if "dim" in params:
                dims[f["name"]] = int(params["dim"])
        for field_name, dim in expected_dims.items():
            if dims.get(field_name) != int(dim):
                raise SchemaMismatch(
                    f"Milvus collection '{name}' at {self._where()}: vector field "
                    f"'{field_name}' has dim {dims.get(field_name)}, configured {dim}. "
                    + self._mismatch_advice()
                )

    def _open_interactions(self) -> None:
        c = self._c
        name = self.interactions_collection
        if not c.has_collection(name):
            self._create(name, interactions_schema(), {PROP_FORMAT: STORE_FORMAT, PROP_ROLE: "interactions"})
        else:
            desc = c.describe_collection(name)
            have = {f["name"] for f in desc.get("fields", [])}
            missing = {F_PK, F_USER, F_ITEM, F_KIND, F_TS} - have
            if missing:
                raise SchemaMismatch(
                    f"Milvus collection '{name}' at {self._where()} is not an interactions "
                    f"collection (missing fields {sorted(missing)}); use another "
                    f"interactions_collection name."
                )
        c.load_collection(name)

    def _load_mirror(self, collection: str, fused_dim: int) -> ItemMirror:
        """An ItemMirror of ``collection``'s rows (ids, fused vectors, attributes)."""
        mirror = ItemMirror(fused_dim, **self._index_params)
        ids: list[str] = []
        vectors: list[np.ndarray] = []
        attrs: list[dict[str, AttributeValue]] = []
        for batch in self._iterate(collection, MIRROR_LOAD_BATCH, ["*"]):
            ids.extend(r[F_ID] for r in batch)
            vectors.append(np.asarray([r[F_FUSED] for r in batch], dtype=np.float32))
            attrs.extend(self._attrs_from_row(r) for r in batch)
        if ids:
            mirror.upsert(ids, np.concatenate(vectors), attrs)
        return mirror

    # ----------------------------------------------------------------- writes

    def _after_write(self, collection: str, rows: int) -> None:
        if self._flush_every <= 0 or rows <= 0:
            return
        with self._lock:
            n = self._pending.get(collection, 0) + rows
            flush = n >= self._flush_every
            self._pending[collection] = 0 if flush else n
        if flush:
            self._c.flush(collection)

    def flush(self) -> None:
        """Flush every collection now (Lite: moves memtable rows into segments)."""
        with self._lock:
            self._pending.clear()
        for name in (self.mvec_collection, self._items, self.interactions_collection):
            self._c.flush(name)

    def _write_chunks(self, rows: list[dict], row_bytes: int) -> Iterator[list[dict]]:
        per = max(1, min(QUERY_CHUNK * 4, MAX_WRITE_BYTES // max(1, row_bytes)))
        for i in range(0, len(rows), per):
            yield rows[i : i + per]

    def _prepare_item(self, item: StoredItem) -> tuple[dict, dict]:
        item_id = check_id(item.item_id)
        fused = as_vector(item.fused, self.schema.fused_dim, f"item {item_id!r} fused")
        mv = item.model_version
        if mv != self.schema.model_version:
            raise SchemaMismatch(
                f"item {item_id!r}: fused vector from model version {mv!r}, but this store holds "
                f"model version {self.schema.model_version!r}; re-run the item tower with the "
                f"configured model or open a store configured for {mv!r}."
            )
        vectors = item.modality_vectors or {}
        unknown = set(vectors) - set(self.schema.modality_dims)
        if unknown:
            raise ValueError(
                f"item {item_id!r}: unknown modalities {sorted(unknown)} "
                f"(store has {self._modalities})"
            )
        versions: dict[str, str] = {}
        mrow: dict[str, Any] = {F_ID: item_id}
        for m in self._modalities:
            dim = self.schema.modality_dims[m]
            if m in vectors and vectors[m] is not None:
                mrow[VEC_PREFIX + m] = as_vector(vectors[m], dim, f"item {item_id!r} {m} vector")
                want = self.schema.encoder_versions.get(m, "")
                got = (item.encoder_versions or {}).get(m, want)
                if got != want:
                    raise SchemaMismatch(
                        f"item {item_id!r}: {m} vector from encoder version {got!r}, but this "
                        f"store holds {m} encoder version {want!r}; re-encode with the "
                        f"configured encoder or open a store configured for {got!r}."
                    )
                versions[m] = got
            else:
                mrow[VEC_PREFIX + m] = np.zeros(dim, dtype=np.float32)
        if not self._modalities:
            mrow[F_MVEC_DUMMY] = np.zeros(DUMMY_DIM, dtype=np.float32)
        mrow[F_MODALITIES] = sorted(versions)
        mrow[F_VERSIONS] = versions
        irow: dict[str, Any] = {F_ID: item_id, F_FUSED: fused, F_MODEL_VERSION: mv}
        for name, value in (item.attributes or {}).items():
            irow[attr_field(name)] = check_attr_value(name, value)
        return irow, mrow

    def _write(self, collection: str, rows: list[dict], row_bytes: int) -> None:
        # Lite's upsert is a partial update (merges onto the old row, so attributes that
        # were removed would survive); its insert replaces a same-pk row whole. A server's
        # upsert replaces whole rows, while its insert would duplicate the pk.
        write = self._c.insert if self._is_lite else self._c.upsert
        for chunk in self._write_chunks(rows, row_bytes):
            write(collection, chunk)

    def upsert(self, items: list[StoredItem]) -> None:
        if not items:
            return
        by_id: dict[str, tuple[dict, dict]] = {}
        for item in items:  # validate everything before writing anything; last one wins
            irow, mrow = self._prepare_item(item)
            by_id.pop(irow[F_ID], None)
            by_id[irow[F_ID]] = (irow, mrow)
        irows = [r for r, _ in by_id.values()]
        mrows = [r for _, r in by_id.values()]
        mbytes = 4 * (sum(self.schema.modality_dims.values()) + DUMMY_DIM) + 512
        ibytes = 4 * self.schema.fused_dim + 1024
        with self._write_lock:
            # modality vectors first, so a searchable item always has its vectors
            self._write(self.mvec_collection, mrows, mbytes)
            self._write(self._items, irows, ibytes)
            if self._mirror is not None:
                self._mirror.upsert(
                    [r[F_ID] for r in irows],
                    np.stack([r[F_FUSED] for r in irows]),
                    [self._attrs_from_row(r) for r in irows],
                )
        self._after_write(self.mvec_collection, len(mrows))
        self._after_write(self._items, len(irows))

    def _existing_ids(self, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(ids), QUERY_CHUNK):
            chunk = ids[i : i + QUERY_CHUNK]
            rows = self._c.query(
                self._items,
                filter=f"{F_ID} in {id_list(chunk)}",
                output_fields=[F_ID],
                limit=len(chunk),
                **self._consistency(),
            )
            found.update(r[F_ID] for r in rows)
        return found

    def delete(self, item_ids: list[str]) -> list[str]:
        ids = list(dict.fromkeys(check_id(i) for i in item_ids))
        if not ids:
            return []
        with self._write_lock:
            existing = self._existing_ids(ids)
            gone = [i for i in ids if i in existing]
            c = self._c
            for i in range(0, len(gone), QUERY_CHUNK):
                expr = f"{F_ID} in {id_list(gone[i : i + QUERY_CHUNK])}"
                c.delete(self._items, filter=expr)
                c.delete(self.mvec_collection, filter=expr)
            if self._mirror is not None:
                self._mirror.delete(gone)
        self._after_write(self._items, len(gone))
        self._after_write(self.mvec_collection, len(gone))
        return gone

    # ----------------------------------------------------------------- reads

    @staticmethod
    def _attrs_from_row(row: dict) -> dict[str, AttributeValue]:
        n = len(ATTR_PREFIX)
        return {k[n:]: v for k, v in row.items() if k.startswith(ATTR_PREFIX)}

    def _fetch(self, collection: str, ids: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for i in range(0, len(ids), QUERY_CHUNK):
            chunk = ids[i : i + QUERY_CHUNK]
            rows = self._c.query(
                collection,
                filter=f"{F_ID} in {id_list(chunk)}",
                output_fields=["*"],
                limit=len(chunk),
                **self._consistency(),
            )
            for r in rows:
                out[r[F_ID]] = r
        return out

    def _assemble(self, irows: dict[str, dict], mrows: dict[str, dict]) -> dict[str, StoredItem]:
        out: dict[str, StoredItem] = {}
        for item_id, ir in irows.items():
            mr = mrows.get(item_id, {})
            present = list(mr.get(F_MODALITIES) or [])
            vectors = {
                m: vec_out(mr[VEC_PREFIX + m])
                for m in present
                if m in self.schema.modality_dims and VEC_PREFIX + m in mr
            }
            versions = dict(mr.get(F_VERSIONS) or {})
            out[item_id] = StoredItem(
                item_id=item_id,
                attributes=self._attrs_from_row(ir),
                modality_vectors=vectors,
                fused=vec_out(ir[F_FUSED]),
                encoder_versions={m: versions.get(m, self.schema.encoder_versions.get(m, "")) for m in vectors},
                model_version=ir.get(F_MODEL_VERSION, ""),
            )
        return out

    def get(self, item_ids: list[str]) -> dict[str, StoredItem]:
        ids = list(dict.fromkeys(check_id(i) for i in item_ids))
        if not ids:
            return {}
        irows = self._fetch(self._items, ids)
        mrows = self._fetch(self.mvec_collection, list(irows)) if irows else {}
        return self._assemble(irows, mrows)

    def fused(self, item_ids: list[str]) -> dict[str, np.ndarray]:
        mirror = self._mirror
        if mirror is None:
            return super().fused(item_ids)
        return mirror.fused([i for i in item_ids if isinstance(i, str)])

    def search(
        self,
        query: np.ndarray,
        k: int,
        filters: list[FilterSpec] | None = None,
        exclude_ids: set[str] | None = None,
    ) -> list[Candidate]:
        q = as_vector(query, self.schema.fused_dim, "query")
        k = int(k)
        if k <= 0:
            return []
        if k > MILVUS_MAX_TOPK:
            raise ValueError(f"k={k} exceeds Milvus' top-k limit of {MILVUS_MAX_TOPK}")
        excluded = set(exclude_ids or ())
        mirror = self._mirror
        if mirror is not None:
            for spec in filters or []:  # same validation (and errors) as the Milvus path
                if filter_clause(spec) is None:
                    return []
            excluded = {i for i in excluded if storable_id(i)}
            return mirror.search(q, k, filters, excluded)
        return self._search_milvus(q, k, filters, excluded)

    def _search_milvus(
        self, q: np.ndarray, k: int, filters: list[FilterSpec] | None, excluded: set[str]
    ) -> list[Candidate]:
        expr = build_filter(filters, excluded)
        if expr is None:
            return []
        res = self._c.search(
            self._items,
            data=[q],
            anns_field=F_FUSED,
            limit=k,
            filter=expr,
            output_fields=["*"],
            search_params=search_params(self._backend, k),
        )
        hits = res[0] if res else []
        out = []
        for h in hits:
            ent = h.get("entity") or {}
            item_id = h.get("id", ent.get(F_ID))
            if item_id in excluded:  # belt and braces; the filter already excludes them
                continue
            out.append(
                Candidate(
                    item_id=item_id,
                    score=float(h["distance"]),
                    fused=vec_out(ent[F_FUSED]),
                    attributes=self._attrs_from_row(ent),
                )
            )
        out.sort(key=lambda cand: -cand.score)
        return out[:k]

    def count(self) -> int:
        rows = self._c.query(self._items, filter="", output_fields=["count(*)"], **self._consistency())
        return int(rows[0]["count(*)"]) if rows else 0

    def memory_bytes(self) -> int:
        """Approximate bytes held by the in-memory search mirror (0 with search_backend="milvus")."""
        mirror = self._mirror
        return mirror.memory_bytes() if mirror is not None else 0

    def _iterate(self, collection: str, batch_size: int, output_fields: list[str], expr: str = ""):
        it = self._c.query_iterator(
            collection, batch_size=batch_size, filter=expr, output_fields=output_fields
        )
        try:
            while True:
                batch = it.next()
                if not batch:
                    break
                yield batch
        finally:
            it.close()

    def iter_items(self, batch_size: int = 1000) -> Iterator[list[StoredItem]]:
        batch_size = max(1, min(int(batch_size), MILVUS_MAX_TOPK))
        for batch in self._iterate(self._items, batch_size, ["*"]):
            irows = {r[F_ID]: r for r in batch}
            mrows = self._fetch(self.mvec_collection, list(irows))
            items = self._assemble(irows, mrows)
            yield [items[r[F_ID]] for r in batch if r[F_ID] in items]

    # ----------------------------------------------------------------- re-indexing

    def _next_items_name(self) -> str:
        m = re.fullmatch(re.escape(self.items_collection) + re.escape(_REINDEX_SEP) + r"(\d+)", self._items)
        n = int(m.group(1)) + 1 if m else 1
        return f"{self.items_collection}{_REINDEX_SEP}{n}"

    def reindex(self, new_schema: StoreSchema, fn: ReindexFn, batch_size: int = 1000) -> int:
        """Recompute every item's fused vector with ``fn`` and switch to them atomically.

        Args:
            new_schema: the schema after re-indexing; its modalities, their dims and encoder
                versions must equal the current ones (only fused_dim/model_version change).
            fn: a batch of StoredItem (modality vectors, attributes, old fused vector) ->
                (len(batch), new_schema.fused_dim) float32 vectors.
            batch_size: items per fn call.

        Returns the number of items re-indexed. The new vectors go into a new items
        collection; the name of the active one is committed to the modality-vectors
        collection's properties (Lite has no aliases), then the old one is dropped. Readers
        see the old vectors until the commit and the new ones after. Writes wait until it
        returns; on error the store is unchanged (the half-built collection is dropped).
        """
        validate_schema(new_schema)
        diffs = modality_differences(self.schema, new_schema)
        if diffs:
            raise ValueError(
                "reindex recomputes fused vectors only; the modality vectors would change:\n"
                + "".join(f"  - {d}\n" for d in diffs)
            )
        batch_size = max(1, min(int(batch_size), MILVUS_MAX_TOPK))
        c = self._c
        with self._write_lock:
            old, new = self._items, self._next_items_name()
            if c.has_collection(new):  # left over by an interrupted reindex
                c.drop_collection(new)
            self._create(new, items_schema(new_schema.fused_dim), self._items_properties(new_schema))
            mirror = ItemMirror(new_schema.fused_dim, **self._index_params) if self._mirror else None
            n = 0
            try:
                for batch in self.iter_items(batch_size):
                    vectors = np.asarray(fn(batch), dtype=np.float32)
                    if vectors.shape != (len(batch), new_schema.fused_dim):
                        raise ValueError(
                            f"reindex fn returned shape {vectors.shape}, expected "
                            f"({len(batch)}, {new_schema.fused_dim})"
                        )
                    if not np.all(np.isfinite(vectors)):
                        raise ValueError("reindex fn returned NaN or inf")
                    rows = []
                    for it, v in zip(batch, vectors):
                        row = {F_ID: it.item_id, F_FUSED: v, F_MODEL_VERSION: new_schema.model_version}
                        row.update({ATTR_PREFIX + k: val for k, val in it.attributes.items()})
                        rows.append(row)
                    self._write(new, rows, 4 * new_schema.fused_dim + 1024)
                    if mirror is not None:
                        mirror.upsert([it.item_id for it in batch], vectors, [it.attributes for it in batch])
                    n += len(batch)
                c.flush(new)
                c.load_collection(new)
            except BaseException:
                c.drop_collection(new)
                raise
            # the commit point: one property write names the active collection
            c.alter_collection_properties(self.mvec_collection, {PROP_ACTIVE_ITEMS: new})
            with self._lock:
                self._items, self.schema = new, new_schema
                self._mirror = mirror
                self._pending.pop(old, None)
            try:
                c.drop_collection(old)
            except Exception:  # pragma: no cover - the switch already happened
                logger.exception("could not drop the replaced items collection %r", old)
        return n

    # ----------------------------------------------------------------- interactions

    @staticmethod
    def _event_from_row(r: dict) -> tuple:
        ev = InteractionEvent(
            user_id=r[F_USER], item_id=r[F_ITEM], kind=r[F_KIND], timestamp_s=float(r[F_TS])
        )
        return (ev.timestamp_s, int(r[F_PK]), ev)

    def _load_history(self) -> None:
        per_user: dict[str, list[tuple]] = {}
        fields = [F_PK, F_USER, F_ITEM, F_KIND, F_TS]
        for batch in self._iterate(self.interactions_collection, 5000, fields):
            for r in batch:
                per_user.setdefault(r[F_USER], []).append(self._event_from_row(r))
        self._history.load(per_user)

    def record_interactions(self, events: list[InteractionEvent]) -> None:
        if not events:
            return
        rows = []
        for ev in events:
            ts = float(ev.timestamp_s)
            if not math.isfinite(ts):
                raise ValueError(f"interaction timestamp must be finite, got {ev.timestamp_s!r}")
            rows.append(
                {
                    F_USER: check_id(ev.user_id, "user id"),
                    F_ITEM: check_id(ev.item_id),
                    F_KIND: check_kind(ev.kind),
                    F_TS: ts,
                    F_DUMMY: [0.0] * DUMMY_DIM,
                }
            )
        pks: list[int] = []
        for i in range(0, len(rows), QUERY_CHUNK * 4):
            res = self._c.insert(self.interactions_collection, rows[i : i + QUERY_CHUNK * 4])
            pks.extend(int(p) for p in res["ids"])
        by_user: dict[str, list[tuple]] = {}
        for r, pk in zip(rows, pks):
            ev = InteractionEvent(r[F_USER], r[F_ITEM], r[F_KIND], r[F_TS])
            by_user.setdefault(ev.user_id, []).append((ev.timestamp_s, pk, ev))
        self._history.recorded(by_user)
        self._after_write(self.interactions_collection, len(rows))

    def history(self, user_id: str, limit: int) -> list[InteractionEvent]:
        limit = int(limit)
        if limit <= 0:
            return []
        cached, gen = self._history.lookup(user_id, limit)
        if cached is not None:
            return cached
        # cache miss (evicted user) or a longer history than cached: read Milvus
        entries = []
        expr = f"{F_USER} == {quote_string(check_id(user_id, 'user id'))}"
        fields = [F_PK, F_USER, F_ITEM, F_KIND, F_TS]
        for batch in self._iterate(self.interactions_collection, 5000, fields, expr):
            entries.extend(self._event_from_row(r) for r in batch)
        entries.sort(key=lambda e: (e[0], e[1]))
        self._history.fill(user_id, entries, gen)
        return [e[2] for e in entries[-limit:]]
