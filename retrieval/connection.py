"""MilvusConnection: one MilvusClient (Lite file or server) and the calls every collection shares.

Creating collections with their indexes, chunked writes, reads by id, iteration, counting and
the flush policy (see lite.py for why unflushed rows matter on Lite) live here; what the
collections hold is the business of the modules that use them.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

from fusionrec.retrieval import lite
from fusionrec.retrieval.expressions import id_list
from fusionrec.retrieval.layout import (
    F_ID,
    FLUSH_EVERY_ROWS_LITE,
    FLUSH_EVERY_ROWS_LITE_MIRRORED,
    INDEX_PARAMS,
    MAX_WRITE_BYTES,
    QUERY_CHUNK,
)

logger = logging.getLogger(__name__)

#: Lite: also flush a collection once this many bytes of rows (by the writers' row size estimate) are
#: pending. Lite's memtable keeps every written row version until a flush, about 1-2 bytes of RSS per row
#: byte: 8192 rows of packed modality vectors (7.9 KB each with the default encoders) held ~60 MiB more,
#: and a soak rewriting 128 items grew the Retrieval replica from 388 to 560 MiB before its flush.
FLUSH_EVERY_BYTES_LITE = 2 << 20
#: Lite: what one write call holds in the memtable until a flush besides its rows (its own Arrow record batch:
#: ~5 KB of C++ objects and ~0.8 KB of Arrow buffers for a one-event interactions insert, measured). Counted
#: toward FLUSH_EVERY_BYTES_LITE, so that it bounds small writes too: a soak's one-event inserts held ~6 KB each
#: against 1 KB counted, and its Retrieval replica grew by them for the ~2,000 calls until a flush.
LITE_BYTES_PER_WRITE_CALL = 6 << 10


def _release_arrow_memory() -> None:
    """Hand memory that Arrow's allocator (jemalloc in the shipped configs, else mimalloc) keeps after frees
    back to the system: a flush and the compaction after it free the memtable's and merged segments' buffers,
    and the pool otherwise holds on to tens of MiB of them (measured in a Retrieval replica: its mimalloc
    arena went 38 -> 66 -> 44 MiB between flushes, every other mapping flat)."""
    try:
        import pyarrow
    except ImportError:  # pragma: no cover - Lite always brings pyarrow
        return
    pyarrow.default_memory_pool().release_unused()


class MilvusConnection:
    """The client of one Milvus (Lite data path ending in ``.db``, or a server URI). Thread-safe.

    Args:
        uri: Lite data path (``*.db``, opened in-process) or server URI.
        token: server token (user:password), if any.
        flush_every_rows: flush a collection after this many written rows; None = auto (on
            Lite 512 when Milvus serves searches, 8192 when an in-memory index does
            (``mirrored``); never on a server), 0 = never, 1 = after every write.
        flush_every_bytes: also flush a collection once this many bytes of rows were written to it since
            its last flush; None = auto (``FLUSH_EVERY_BYTES_LITE`` on Lite unless flushing is off), 0 = never.
        mirrored: searches run on an in-memory copy, not on Milvus.
        consistency_level: of every read on a server (server_items.ServerOptions); Lite is always
            read-your-writes.
    """

    def __init__(self, uri: str, token: str = "", flush_every_rows: int | None = None,
                 mirrored: bool = True, consistency_level: str = "Strong",
                 flush_every_bytes: int | None = None) -> None:
        self.uri = uri
        self.is_lite = uri.endswith(".db")
        self.backend = "lite" if self.is_lite else "server"
        self.consistency_level = consistency_level
        if flush_every_rows is None:  # see lite.py: unflushed rows slow Lite's own search, not reads by id
            flush_every_rows = 0 if not self.is_lite else (
                FLUSH_EVERY_ROWS_LITE_MIRRORED if mirrored else FLUSH_EVERY_ROWS_LITE)
        self.flush_every = int(flush_every_rows)
        if flush_every_bytes is None:  # bounds the memtable where rows are wide (an upsert rewrites whole rows)
            flush_every_bytes = FLUSH_EVERY_BYTES_LITE if self.is_lite and self.flush_every > 0 else 0
        self.flush_every_bytes = int(flush_every_bytes)
        self._pending: dict[str, int] = {}
        self._pending_bytes: dict[str, int] = {}
        self._loading: list[str] = []
        self._local = threading.local()
        self._probe_pool = ThreadPoolExecutor(4, thread_name_prefix="milvus-probe")
        self._lock = threading.RLock()
        self._closed = False
        self._lite_path: str | None = None
        self._client = None
        try:
            self._client = self._connect(uri, token)
        except BaseException:
            self.close()
            raise

    def _connect(self, uri: str, token: str):
        from pymilvus import MilvusClient

        if not self.is_lite:
            lite.install_log_filter()  # a 2.3 server has no mvccTs for iterators either
            return MilvusClient(uri=uri, token=token)
        path = os.path.abspath(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lite.install_log_filter()
        lite.acquire(path)
        self._lite_path = path
        try:
            return MilvusClient(uri=path)
        except Exception as e:
            raise RuntimeError(
                f"could not open Milvus Lite data at {path}: {e}. A Lite data dir can be "
                "opened by one process at a time; to share it, run `milvus-lite server "
                "--data-dir <dir> --port <port>` and use http://127.0.0.1:<port> as the URI."
            ) from e

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, self._client = self._client, None
        self._probe_pool.shutdown(wait=False)
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - best effort
                logger.exception("closing the Milvus client failed")
        if self._lite_path is not None:
            path, self._lite_path = self._lite_path, None
            lite.release(path)

    def __del__(self) -> None:  # pragma: no cover - safety net only
        try:
            if not self._closed and self._lite_path is not None:
                self.close()
        except Exception:
            pass

    @property
    def client(self):
        if self._closed or self._client is None:
            raise RuntimeError("MilvusStore is closed")
        return self._client

    @property
    def where(self) -> str:
        """The data's location, for messages."""
        return self._lite_path or self.uri

    def consistency(self) -> dict[str, Any]:
        # Lite is always read-your-writes; on a server ask for the configured level explicitly.
        if self.is_lite:
            return {}
        return {"consistency_level": "Bounded" if getattr(self._local, "caught_up", False) else self.consistency_level}

    @contextmanager
    def caught_up(self, probes: dict[str, str]) -> Iterator[None]:
        """Within the block this thread's reads of the ``probes`` collections (name -> a filter matching
        nothing) see every write acknowledged before it began, for one Strong read per collection, run
        concurrently, instead of one per read. A Strong read waits for the server's next time tick; after
        it the server answers a Bounded read of the same collection at its current safe time, which has
        passed the Strong one's (Milvus 2.3.5, probed here: 20 of 20 fresh writes seen)."""
        if self.is_lite or self.consistency_level != "Strong" or getattr(self._local, "caught_up", False):
            yield
            return
        list(self._probe_pool.map(
            lambda kv: self.client.query(kv[0], filter=kv[1], limit=1, consistency_level="Strong"), probes.items()))
        self._local.caught_up = True
        try:
            yield
        finally:
            self._local.caught_up = False

    # ----------------------------------------------------------------- collections

    def _index_params_for(self, fields: list[tuple[str, str]]):
        ip = self.client.prepare_index_params()
        for field_name, role in fields:
            p = INDEX_PARAMS[self.backend][role]
            ip.add_index(
                field_name=field_name,
                index_type=p["index_type"],
                metric_type=p["metric_type"],
                params=dict(p["params"]),
            )
        return ip

    def create(self, name: str, built, properties: dict[str, str]) -> None:
        """Create collection ``name`` from a layout.py (schema, index fields) pair."""
        schema, idx = built
        self.client.create_collection(collection_name=name, schema=schema, properties=properties,
                                      **self.consistency())
        # sync=False: pymilvus' index wait loop sleeps 0.5 s per index even on an empty
        # collection; the index exists (and Lite builds it) as soon as the call returns.
        self.client.create_index(name, self._index_params_for(idx), sync=False)

    def load(self, name: str) -> None:
        """Load collection ``name`` (a no-op when loaded): at once on Lite; on a server only started
        here and waited for by ``wait_loaded``, since a 2.3 server takes ~2.5 s per load even of an
        empty collection and loads several at once in about the time of one."""
        if self.is_lite:
            self.client.load_collection(name)
            return
        self.client.load_collection(name, _async=True)
        with self._lock:
            self._loading.append(name)

    def wait_loaded(self) -> None:
        """Return once every collection ``load`` started is loaded."""
        with self._lock:
            names, self._loading = self._loading, []
        for name in names:
            self.client.load_collection(name)  # waits for the load already under way

    # ----------------------------------------------------------------- reads

    def fetch(self, collection: str, ids: list[str], output_fields: list[str] | None = None) -> dict[str, dict]:
        """Rows of ``collection`` by id (missing ids absent), ``QUERY_CHUNK`` ids per query."""
        out: dict[str, dict] = {}
        for i in range(0, len(ids), QUERY_CHUNK):
            chunk = ids[i : i + QUERY_CHUNK]
            rows = self.client.query(
                collection,
                filter=f"{F_ID} in {id_list(chunk)}",
                output_fields=output_fields or ["*"],
                limit=len(chunk),
                **self.consistency(),
            )
            for r in rows:
                out[r[F_ID]] = r
        return out

    def iterate(self, collection: str, batch_size: int, output_fields: list[str], expr: str = "") -> Iterator[list[dict]]:
        it = self.client.query_iterator(
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

    def count(self, collection: str) -> int:
        rows = self.client.query(collection, filter="", output_fields=["count(*)"], **self.consistency())
        return int(rows[0]["count(*)"]) if rows else 0

    # ----------------------------------------------------------------- writes

    def write(self, collection: str, rows: list[dict], row_bytes: int) -> None:
        """Insert-or-replace whole rows, in calls of at most ``MAX_WRITE_BYTES``."""
        # Lite's upsert is a partial update (merges onto the old row, so attributes that
        # were removed would survive); its insert replaces a same-pk row whole. A server's
        # upsert replaces whole rows, while its insert would duplicate the pk.
        self._chunked(self.client.insert if self.is_lite else self.client.upsert, collection, rows, row_bytes)

    def append(self, collection: str, rows: list[dict], row_bytes: int) -> list[int]:
        """Insert rows of an auto-id collection (in calls of at most ``MAX_WRITE_BYTES``); their new ids."""
        return [int(pk) for res in self._chunked(self.client.insert, collection, rows, row_bytes) for pk in res["ids"]]

    def _chunked(self, write, collection: str, rows: list[dict], row_bytes: int) -> list[Any]:
        """``write`` of ``rows`` in calls of at most ``MAX_WRITE_BYTES``, their bytes counted toward the flush."""
        per = max(1, min(QUERY_CHUNK * 4, MAX_WRITE_BYTES // max(1, row_bytes)))
        results = [write(collection, rows[i : i + per]) for i in range(0, len(rows), per)]
        held = len(rows) * row_bytes + (len(results) * LITE_BYTES_PER_WRITE_CALL if self.is_lite else 0)
        with self._lock:
            self._pending_bytes[collection] = self._pending_bytes.get(collection, 0) + held
        return results

    def after_write(self, collection: str, rows: int) -> None:
        """Count ``rows`` written to ``collection``; flush it once ``flush_every`` rows or ``flush_every_bytes``
        bytes (counted by ``write``) are pending."""
        if self.flush_every <= 0 or rows <= 0:
            return
        with self._lock:
            n = self._pending.get(collection, 0) + rows
            flush = n >= self.flush_every or 0 < self.flush_every_bytes <= self._pending_bytes.get(collection, 0)
            self._pending[collection] = 0 if flush else n
            if flush:
                self._pending_bytes[collection] = 0
        if flush:
            self.client.flush(collection)
            if self.is_lite:
                _release_arrow_memory()

    def forget_pending(self, collection: str) -> None:
        """``collection`` is gone (replaced by a re-index): stop counting its rows."""
        with self._lock:
            self._pending.pop(collection, None)
            self._pending_bytes.pop(collection, None)

    def flush(self, collections: list[str]) -> None:
        """Flush these collections now (Lite: moves memtable rows into segments)."""
        with self._lock:
            self._pending.clear()
            self._pending_bytes.clear()
        for name in collections:
            self.client.flush(name)
