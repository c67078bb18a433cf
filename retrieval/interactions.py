"""InteractionLog: the interactions collection (append-only events), per-user history and popularity.

On Milvus Lite (one owner process) history is cached per user and interaction counts are kept in
step with every write, both filled by a full scan at open. On a server, where several replicas write,
history is read from the server on every call, and counts are recounted from it at most every
``popularity_ttl_s`` (a replica's own records count at once on it).
"""

from __future__ import annotations

import math
import time
from collections import Counter

from fusionrec.core.rules import check_id, check_kind
from fusionrec.retrieval.base import InteractionEvent, SchemaMismatch
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.expressions import quote_string
from fusionrec.retrieval.history import HistoryCache
from fusionrec.retrieval.layout import (
    DUMMY_DIM,
    F_DUMMY,
    F_ITEM,
    F_KIND,
    F_PK,
    F_TS,
    F_USER,
    MILVUS_MAX_TOPK,
    PROP_FORMAT,
    PROP_ROLE,
    QUERY_CHUNK,
    STORE_FORMAT,
    interactions_schema,
)

_FIELDS = [F_PK, F_USER, F_ITEM, F_KIND, F_TS]
_SCAN_BATCH = 5000


def _entry(r: dict) -> tuple:
    """A history entry (ts, pk, InteractionEvent) of an interactions row."""
    ev = InteractionEvent(
        user_id=r[F_USER], item_id=r[F_ITEM], kind=r[F_KIND], timestamp_s=float(r[F_TS])
    )
    return (ev.timestamp_s, int(r[F_PK]), ev)


class InteractionLog:
    """Interaction events in Milvus collection ``collection``.

    Args:
        cache: recent events per user (one owner process); None: read history from Milvus each time.
        popularity_ttl_s: without a cache, recount interactions from Milvus at most this often.
    """

    def __init__(self, conn: MilvusConnection, collection: str, cache: HistoryCache | None,
                 popularity_ttl_s: float = 5.0) -> None:
        self.conn = conn
        self.collection = collection
        self._cache = cache
        self._counts: Counter[str] = Counter()  # item id -> recorded interactions
        self._ranked: list[tuple[str, int]] | None = None  # _counts sorted, until the next record
        self._counted_at = float("-inf")  # without a cache: when _counts was last recounted
        self._popularity_ttl_s = float(popularity_ttl_s)

    def open(self) -> None:
        """Create or check the collection, load it, and (with a cache) fill the cache and counts from a full scan."""
        c = self.conn.client
        name = self.collection
        if not c.has_collection(name):
            self.conn.create(name, interactions_schema(), {PROP_FORMAT: STORE_FORMAT, PROP_ROLE: "interactions"})
        else:
            desc = c.describe_collection(name)
            have = {f["name"] for f in desc.get("fields", [])}
            missing = set(_FIELDS) - have
            if missing:
                raise SchemaMismatch(
                    f"Milvus collection '{name}' at {self.conn.where} is not an interactions "
                    f"collection (missing fields {sorted(missing)}); use another "
                    f"interactions_collection name."
                )
        self.conn.load(name)
        if self._cache is None:
            return  # read on demand
        per_user: dict[str, list[tuple]] = {}
        for batch in self.conn.iterate(name, _SCAN_BATCH, _FIELDS):
            for r in batch:
                per_user.setdefault(r[F_USER], []).append(_entry(r))
                self._counts[r[F_ITEM]] += 1
        self._cache.load(per_user)

    def record(self, events: list[InteractionEvent]) -> None:
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
            res = self.conn.client.insert(self.collection, rows[i : i + QUERY_CHUNK * 4])
            pks.extend(int(p) for p in res["ids"])
        by_user: dict[str, list[tuple]] = {}
        for r, pk in zip(rows, pks):
            ev = InteractionEvent(r[F_USER], r[F_ITEM], r[F_KIND], r[F_TS])
            by_user.setdefault(ev.user_id, []).append((ev.timestamp_s, pk, ev))
        if self._cache is not None:
            self._cache.recorded(by_user)
        self._counts.update(r[F_ITEM] for r in rows)
        self._ranked = None
        self.conn.after_write(self.collection, len(rows))

    def popularity(self) -> list[tuple[str, int]]:
        """(item id, events), most first; ties by id so the order is stable. Sorted once per write."""
        if self._cache is None and time.monotonic() - self._counted_at >= self._popularity_ttl_s:
            self._recount()
        ranked = self._ranked
        if ranked is None:
            ranked = self._ranked = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked

    def _recount(self) -> None:
        counts: Counter[str] = Counter()
        for batch in self.conn.iterate(self.collection, _SCAN_BATCH, [F_ITEM]):
            counts.update(r[F_ITEM] for r in batch)
        self._counts, self._ranked, self._counted_at = counts, None, time.monotonic()

    def events(self) -> list[InteractionEvent]:
        """Every recorded event, from the collection (not the cache), ordered by (user, time, write order)."""
        entries = [_entry(r) for batch in self.conn.iterate(self.collection, _SCAN_BATCH, _FIELDS) for r in batch]
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
        entries = self._read_user(check_id(user_id, "user id"))
        entries.sort(key=lambda e: (e[0], e[1]))
        if self._cache is not None:
            self._cache.fill(user_id, entries, gen)
        return [e[2] for e in entries[-limit:]]

    def _read_user(self, user_id: str) -> list[tuple]:
        """Every event of one user: one query (under the server's top-k cap), else an iterator."""
        expr = f"{F_USER} == {quote_string(user_id)}"
        if not self.conn.is_lite:
            rows = self.conn.client.query(self.collection, filter=expr, output_fields=_FIELDS,
                                          limit=MILVUS_MAX_TOPK, **self.conn.consistency())
            if len(rows) < MILVUS_MAX_TOPK:
                return [_entry(r) for r in rows]
        return [_entry(r) for batch in self.conn.iterate(self.collection, _SCAN_BATCH, _FIELDS, expr) for r in batch]
