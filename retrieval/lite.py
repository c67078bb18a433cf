"""Milvus Lite plumbing: one in-process server per data dir (ref-counted), log noise filter.

What milvus-lite 3.2.2 + pymilvus 3.0.2 actually do (probed on this machine, 2 cores)
-----------------------------------------------------------------------------------
- Several FLOAT_VECTOR fields in one collection: supported (each needs an index to load).
- A collection needs at least one vector field ("schema has no vector field"), hence the
  2-d dummy vector in the interactions collection.
- JSON field + path filters: ``attrs["g"] == "rock"``, ``attrs["y"] >= 1990``, ``== true``
  work, but ``attrs["g"] in [...]`` is rejected ("left side of 'in' must be a field
  reference"), and every JSON-path filter is evaluated row by row in Python over
  ``table.to_pylist()`` of *all* columns: 350 ms per filtered search at 5k rows when the
  384/128-d modality vectors sit in the same collection (48 ms without them).
- Dynamic-field keys (``enable_dynamic_field=True``; filter ``attr_genre == "rock"``) go
  through Lite's vectorised "hybrid" backend, which parses only ``$meta``: ~20-35 ms at 5k
  rows, ~110-170 ms at 20k, and ``attr_genre in ["a", "b"]`` works. Mixed value types
  under one key fall back to row-wise Python (~120 ms at 5k lean, ~820 ms at 5k wide).
  Comparisons follow Python semantics either way: ``true == 1`` and ``1.0 == 1`` match,
  ``"1" == 1`` does not, numeric ranges skip strings, big ints compare exactly.
  ``in`` lists must be of one type.
- ``id not in [...]`` works (arrow path, +1-15 ms for 200-2000 ids); ``id in [...]`` too.
- String literals: double or single quotes; escapes ``\\" \\' \\\\ \\n \\r \\t`` only (no
  ``\\u``); raw newlines are rejected. Numbers: ``-5``, ``1e+20``, ``1.5e-07`` parse.
- pymilvus ``get(ids=...)`` / ``delete(ids=...)`` build ``id in ['<raw id>']`` WITHOUT
  escaping: an id containing ``'`` breaks or rewrites the expression. The store never
  uses ``ids=``; it always passes its own escaped ``filter``.
- ``delete`` returns the ids it was given, existing or not (so the store looks them up first).
- ``upsert`` is a PARTIAL update in Lite (the old row is read and the new fields merged
  onto it, so a dynamic key absent from the new row survives), unlike a server's upsert,
  which replaces the row. Lite's ``insert`` of an existing pk replaces the whole row (last
  write wins, count stays right, also across flush and reopen), and skips the per-row
  read: on Lite writes use ``insert``, on a server ``upsert``.
- ``query(filter, limit)``, ``query_iterator`` (logs a harmless "failed to get
  mvccTs" warning on Lite, filtered below), ``count(*)``, returning vector fields from
  search/query: all work. Vectors come back as Python lists.
- Collection ``properties`` persist across reopen (and ``alter_collection_properties``
  works); the schema ``description`` is NOT persisted (comes back ``""``). Aliases and
  partitions: not supported (see DESIGN).
- Writes go to a WAL before returning: rows survive ``os._exit`` without flush or close
  (recovered on open). Not fsynced (OS crash can lose the tail). After reopen a collection
  is "NotLoad" and must be ``load_collection``-ed before search.
- Unflushed rows sit in a memtable (auto-flush only at 128 MiB) that every search scans in
  Python: ~20 us per unflushed row per search (5k unflushed: 68 ms vs 8 ms flushed; 20k:
  420 ms vs 30 ms); 1-100 unflushed rows cost nothing measurable. ``flush`` costs ~6-20 ms
  for a small write and ~50 us/row for bulk (20k rows: 1.06 s). Policy chosen: flush a
  collection once >= ``flush_every_rows`` rows were written since its last flush: 512 when
  Lite serves searches, 8192 when the in-memory index does (search_backend="memory"). There
  Lite only answers reads by id, which 6.6k unflushed rows left at 2-7 ms. Flushing every 512
  cost the write path ~0.4 ms/item: 16-item upserts into a 2k-row store ran at 500-640
  items/s at 512 and 760-920 at 4096 (/tmp script, 1024 items per run). Durability does not
  depend on flushing (WAL). On a server URI auto-flush is off.
- pymilvus' ``create_index`` waits in 0.5 s sleeps even on an empty collection (opening a
  new store took 2.2 s); indexes are created with ``sync=False`` (open: ~40 ms).
- ``MilvusClient.close()`` does not release the Lite data dir lock; the in-process
  server must be stopped via ``milvus_lite.server_manager_instance.release_server``.
  pymilvus reuses one Lite server per path inside a process, so the release is
  reference-counted here.
"""

from __future__ import annotations

import logging
import threading

_LITE_LOCK = threading.Lock()
_LITE_REFS: dict[str, int] = {}
_MVCC_FILTER_INSTALLED = False


class _DropMvccWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        return not str(record.getMessage()).startswith("failed to get mvccTs")


def install_log_filter() -> None:
    """Silence Lite's harmless per-iterator "failed to get mvccTs" warning."""
    global _MVCC_FILTER_INSTALLED
    if not _MVCC_FILTER_INSTALLED:
        logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_DropMvccWarning())
        _MVCC_FILTER_INSTALLED = True


def acquire(path: str) -> None:
    """Count one more user of the in-process Lite server for ``path``."""
    with _LITE_LOCK:
        _LITE_REFS[path] = _LITE_REFS.get(path, 0) + 1


def release(path: str) -> None:
    """Drop one user; the last one stops the server and frees the data dir lock."""
    with _LITE_LOCK:
        n = _LITE_REFS.get(path, 0) - 1
        if n > 0:
            _LITE_REFS[path] = n
            return
        _LITE_REFS.pop(path, None)
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(path)
