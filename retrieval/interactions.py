"""InteractionLog: the interactions collections (append-only events), per-user history and popularity.

Events without an id are appended to ``<interactions>`` (auto-id). Events with an idempotency key
(``event_id``, unique per user) go to ``<interactions>_keyed``, whose primary key is a hash of
(user id, event id): a key stored already is skipped (and counted as a duplicate), and two replicas
racing on the same key write the same row, so a retried event is stored once on Lite and on a server.

On Milvus Lite (one owner process) history is cached per user and interaction counts are kept in
step with every write, both filled by a full scan at open. On a server, where several replicas write,
history is read from the server on every call, and counts are recounted from it at most every
``popularity_ttl_s`` (a replica's own records count at once on it).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import Counter
from typing import Iterator

from fusionrec.core.rules import check_event_id, check_id, check_kind
from fusionrec.retrieval.base import InteractionEvent, SchemaMismatch
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.expressions import quote_string
from fusionrec.retrieval.history import HistoryCache
from fusionrec.retrieval.layout import (
    DUMMY_DIM,
    F_DUMMY,
    F_EVENT_ID,
    F_ID,
    F_ITEM,
    F_KIND,
    F_PK,
    F_SEQ,
    F_TS,
    F_USER,
    KEYED_SUFFIX,
    MILVUS_MAX_TOPK,
    PROP_FORMAT,
    PROP_ROLE,
    STORE_FORMAT,
    interactions_schema,
    keyed_interactions_schema,
)

_FIELDS = [F_PK, F_USER, F_ITEM, F_KIND, F_TS]
_KEYED_FIELDS = [F_SEQ, F_USER, F_ITEM, F_KIND, F_TS, F_EVENT_ID]
_SCAN_BATCH = 5000
_ROW_BYTES = 1024


def event_key(user_id: str, event_id: str) -> str:
    """The keyed collection's primary key of (user, event id): fixed length, whatever the ids' sizes."""
    raw = f"{user_id}\x00{event_id}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).hexdigest()


def _entry(r: dict) -> tuple:
    """A history entry (ts, order, InteractionEvent) of a row of either collection."""
    ev = InteractionEvent(user_id=r[F_USER], item_id=r[F_ITEM], kind=r[F_KIND], timestamp_s=float(r[F_TS]),
                          event_id=r.get(F_EVENT_ID) or "")
    return (ev.timestamp_s, int(r[F_PK] if F_PK in r else r[F_SEQ]), ev)


class InteractionLog:
    """Interaction events in Milvus collections ``collection`` and ``collection + "_keyed"``.

    Args:
        cache: recent events per user (one owner process); None: read history from Milvus each time.
        popularity_ttl_s: without a cache, recount interactions from Milvus at most this often.
    """

    def __init__(self, conn: MilvusConnection, collection: str, cache: HistoryCache | None,
                 popularity_ttl_s: float = 5.0) -> None:
        self.conn = conn
        self.collection = collection
        self.keyed = collection + KEYED_SUFFIX
        self.collections = [collection, self.keyed]
        self._cache = cache
        self._counts: Counter[str] = Counter()  # item id -> recorded interactions
        self._ranked: list[tuple[str, int]] | None = None  # _counts sorted, until the next record
        self._counted_at = float("-inf")  # without a cache: when _counts was last recounted
        self._popularity_ttl_s = float(popularity_ttl_s)
        self._seq = 0
        self._seq_lock = threading.Lock()

    def open(self) -> None:
        """Create or check the collections, load them, and (with a cache) fill the cache and counts from a full scan."""
        self._open_collection(self.collection, interactions_schema, _FIELDS, "interactions")
        self._open_collection(self.keyed, keyed_interactions_schema, [F_ID, *_KEYED_FIELDS], "interactions_keyed")
        if self._cache is None:
            return  # read on demand
        per_user: dict[str, list[tuple]] = {}
        for r in self._scan():
            per_user.setdefault(r[F_USER], []).append(_entry(r))
            self._counts[r[F_ITEM]] += 1
        self._cache.load(per_user)

    def _open_collection(self, name: str, schema_fn, fields: list[str], role: str) -> None:
        c = self.conn.client
        if not c.has_collection(name):
            self.conn.create(name, schema_fn(), {PROP_FORMAT: STORE_FORMAT, PROP_ROLE: role})
        else:
            have = {f["name"] for f in c.describe_collection(name).get("fields", [])}
            missing = set(fields) - have
            if missing:
                raise SchemaMismatch(
                    f"Milvus collection '{name}' at {self.conn.where} is not an {role} collection "
                    f"(missing fields {sorted(missing)}); use another interactions_collection name."
                )
        self.conn.load(name)

    def _scan(self, fields: tuple[list[str], list[str]] = (_FIELDS, _KEYED_FIELDS), expr: str = "") -> Iterator[dict]:
        """Every row of both collections (``fields`` per collection), matching ``expr``."""
        for name, out in zip(self.collections, fields):
            for batch in self.conn.iterate(name, _SCAN_BATCH, out, expr):
                yield from batch

    # ----------------------------------------------------------------- writes

    def record(self, events: list[InteractionEvent]) -> int:
        """Store ``events``; returns how many were new (a (user, event id) stored before, or earlier in
        ``events``, is skipped). Every event is checked before anything is written."""
        if not events:
            return 0
        plain, keyed = self._rows(events)
        keyed = self._unseen(keyed)
        entries: list[tuple[dict, int]] = list(zip(plain, self.conn.append(self.collection, plain, _ROW_BYTES)))
        if keyed:
            self.conn.write(self.keyed, keyed, _ROW_BYTES)
            entries.extend((r, r[F_SEQ]) for r in keyed)
        by_user: dict[str, list[tuple]] = {}
        for r, order in entries:
            ev = InteractionEvent(r[F_USER], r[F_ITEM], r[F_KIND], r[F_TS], r.get(F_EVENT_ID, ""))
            by_user.setdefault(ev.user_id, []).append((ev.timestamp_s, order, ev))
        if self._cache is not None:
            self._cache.recorded(by_user)
        self._counts.update(r[F_ITEM] for r, _ in entries)
        self._ranked = None
        self.conn.after_write(self.collection, len(plain))
        self.conn.after_write(self.keyed, len(keyed))
        return len(entries)

    def _rows(self, events: list[InteractionEvent]) -> tuple[list[dict], list[dict]]:
        """(rows without an event id, rows with one: the first of each (user, event id) only)."""
        plain: list[dict] = []
        keyed: dict[str, dict] = {}
        for ev in events:
            ts = float(ev.timestamp_s)
            if not math.isfinite(ts):
                raise ValueError(f"interaction timestamp must be finite, got {ev.timestamp_s!r}")
            row = {F_USER: check_id(ev.user_id, "user id"), F_ITEM: check_id(ev.item_id),
                   F_KIND: check_kind(ev.kind), F_TS: ts, F_DUMMY: [0.0] * DUMMY_DIM}
            event_id = check_event_id(ev.event_id or "")
            if not event_id:
                plain.append(row)
                continue
            key = event_key(row[F_USER], event_id)
            if key not in keyed:
                keyed[key] = {F_ID: key, F_SEQ: self._next_seq(), F_EVENT_ID: event_id, **row}
        return plain, list(keyed.values())

    def _next_seq(self) -> int:
        """Write order of keyed rows (their tie-break at equal timestamps): increasing in this process."""
        with self._seq_lock:
            self._seq = max(self._seq + 1, time.time_ns())
            return self._seq

    def _unseen(self, rows: list[dict]) -> list[dict]:
        """The keyed rows whose key is not stored yet."""
        if not rows:
            return rows
        stored = self.conn.fetch(self.keyed, [r[F_ID] for r in rows], [F_ID])
        return [r for r in rows if r[F_ID] not in stored]

    # ----------------------------------------------------------------- reads

    def popularity(self) -> list[tuple[str, int]]:
        """(item id, events), most first; ties by id so the order is stable. Sorted once per write."""
        if self._cache is None and time.monotonic() - self._counted_at >= self._popularity_ttl_s:
            self._recount()
        ranked = self._ranked
        if ranked is None:
            ranked = self._ranked = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked

    def _recount(self) -> None:
        counts = Counter(r[F_ITEM] for r in self._scan(([F_ITEM], [F_ITEM])))
        self._counts, self._ranked, self._counted_at = counts, None, time.monotonic()

    def events(self) -> list[InteractionEvent]:
        """Every recorded event, from the collections (not the cache), ordered by (user, time, write order)."""
        entries = [_entry(r) for r in self._scan()]
        entries.sort(key=lambda e: (e[2].user_id, e[0], e[1]))
        return [e[2] for e in entries]

    def history(self, user_id: str, limit: int) -> list[InteractionEvent]:
        limit = int(limit)
        if limit <= 0:
            return []
        gen = 0
        if self._cache is not None:
            cached, gen = self._cache.lookup(user_id, limit)
            if cached is not None:
                return cached
        # no cache, a cache miss (evicted user) or a longer history than cached: read Milvus
        user_id = check_id(user_id, "user id")
        entries = [*self._read_user(self.collection, _FIELDS, user_id),
                   *self._read_user(self.keyed, _KEYED_FIELDS, user_id)]
        entries.sort(key=lambda e: (e[0], e[1]))
        if self._cache is not None:
            self._cache.fill(user_id, entries, gen)
        return [e[2] for e in entries[-limit:]]

    def _read_user(self, collection: str, fields: list[str], user_id: str) -> list[tuple]:
        """Every event of one user in ``collection``: one query (under the server's top-k cap), else an iterator."""
        expr = f"{F_USER} == {quote_string(user_id)}"
        if not self.conn.is_lite:
            rows = self.conn.client.query(collection, filter=expr, output_fields=fields,
                                          limit=MILVUS_MAX_TOPK, **self.conn.consistency())
            if len(rows) < MILVUS_MAX_TOPK:
                return [_entry(r) for r in rows]
        return [_entry(r) for batch in self.conn.iterate(collection, _SCAN_BATCH, fields, expr) for r in batch]
