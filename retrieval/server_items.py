"""The items collections on a Milvus server, shared by every Retrieval replica (layout.py: server layout).

Readers use the alias ``<items>``: a re-index or an encoder-swap commit builds ``<items>__r<n+1>`` and
moves the alias (``switch``), so every replica reads the new collection from its next call on. What
the vectors mean (the StoreSchema in the collection's properties) is re-read when the alias moved:
at most ``state_ttl_s`` after the switch, or at once when a caller meets another model version.

Writers go through ``fenced``: they wait while another replica rebuilds (the lock, server_lock.py),
write into the concrete collection the alias names, and check afterwards that no rebuild began
meanwhile. One that did may have copied the collection before the write, so the write is repeated
once the rebuild is over, against the new schema (SchemaMismatch when the vectors no longer fit it:
the gateway fuses them again). So every acknowledged write is in the collection readers use.

A replaced collection is never dropped while the alias names it (Milvus 2.3 would leave a dangling
alias that can be neither described nor re-created, probed here), and only ``retire_grace_s`` after
the switch, so a query that resolved it just before finishes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from fusionrec.retrieval.base import SchemaMismatch, StoreSchema
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.item_collections import (
    REINDEX_SEP,
    CollectionNames,
    items_properties,
    reconcile_schema,
    stored_schema,
)
from fusionrec.retrieval.layout import (
    LOCK_SUFFIX,
    PROP_FORMAT,
    PROP_LAYOUT,
    PROP_RETIRED,
    PROP_ROLE,
    SERVER_LAYOUT,
    STATE_SUFFIX,
    STORE_FORMAT,
    items_schema,
    marker_schema,
)
from fusionrec.retrieval.server_lock import RebuildLock

logger = logging.getLogger(__name__)

CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")


@dataclass(frozen=True)
class ServerOptions:
    """How replicas share a Milvus server (ignored on Milvus Lite).

    consistency_level: of every read. "Strong": a read sees every write acknowledged before it
        started, by any replica (read-your-writes across replicas); it waits for the server's next
        time tick (``proxy.timeTickInterval``, README). "Bounded": at most ``common.gracefulTime``
        (5 s by default) stale; "Session": this process's own writes; "Eventually": no bound.
    state_ttl_s: a replica re-reads which collection the alias names (and its schema) at most this
        long after another replica switched it; a caller naming another model version forces it.
    write_wait_s: longest a write waits for another replica's rebuild before UNAVAILABLE.
    rebuild_wait_s: longest a re-index or swap commit waits for the lock held by another replica.
    retire_grace_s: a replaced items collection is dropped this long after the switch.
    lock_lease_s: a rebuild lock without a heartbeat for this long is broken by the next taker.
    popularity_ttl_s: interaction counts (popular items for cold users) are recounted from the
        server at most this often; a replica's own records take effect at once on it.
    """

    consistency_level: str = "Strong"
    state_ttl_s: float = 1.0
    write_wait_s: float = 60.0
    rebuild_wait_s: float = 600.0
    retire_grace_s: float = 60.0
    lock_lease_s: float = 30.0
    popularity_ttl_s: float = 5.0

    def __post_init__(self) -> None:
        if self.consistency_level not in CONSISTENCY_LEVELS:
            raise ValueError(f"consistency_level must be one of {CONSISTENCY_LEVELS}, got {self.consistency_level!r}")


class ServerItems:
    """Alias, live collection and schema, write fence and switch of the items on a server. Thread-safe."""

    def __init__(self, conn: MilvusConnection, names: CollectionNames, options: ServerOptions) -> None:
        self.conn = conn
        self.names = names
        self.options = options
        self.alias = names.items
        self.state_name = names.items + STATE_SUFFIX
        self.lock = RebuildLock(conn, names.items + LOCK_SUFFIX, options.lock_lease_s)
        self.target = ""  # the concrete collection the alias named when last looked at
        self.schema: StoreSchema | None = None
        self._checked_at = float("-inf")
        self._guard = threading.Lock()
        self._timers: list[threading.Timer] = []

    # ----------------------------------------------------------------- opening

    def open(self, schema: StoreSchema, accept_stored_model: bool) -> StoreSchema:
        """Create the store on first use (under the lock), else check it holds what is configured."""
        if not self.conn.client.has_collection(self.state_name):
            self.lock.acquire("create", self.options.rebuild_wait_s)
            try:
                if not self.conn.client.has_collection(self.state_name):
                    self._create(schema)
            finally:
                self.lock.release()
        target = self._alias_target()
        stored = stored_schema(self.conn, target, self.conn.client.describe_collection(target))
        reconcile_schema(self.conn, self.names, target, stored, schema, accept_stored_model, f" (alias '{self.alias}')")
        self.conn.load(target)
        self.target, self.schema, self._checked_at = target, stored, time.monotonic()
        return stored

    def _create(self, schema: StoreSchema) -> None:
        c = self.conn.client
        if self._try_alias() is None:  # else a creation that stopped before the state collection
            if c.has_collection(self.alias):
                raise SchemaMismatch(
                    f"Milvus collection '{self.alias}' at {self.conn.where} exists but is not a fusionrec store of "
                    f"the server layout (no '{self.state_name}'). Use another items_collection name, or drop it.")
            first = f"{self.alias}{REINDEX_SEP}0"
            if c.has_collection(first):  # left by a creation that did not get to the alias
                c.drop_collection(first)
            self.conn.create(first, items_schema(schema.fused_dim), items_properties(schema))
            c.create_alias(first, self.alias)
        # last: the state collection marks a complete store
        c.create_collection(self.state_name, schema=marker_schema()[0],
                            properties={PROP_FORMAT: STORE_FORMAT, PROP_ROLE: "state", PROP_LAYOUT: SERVER_LAYOUT})

    def _try_alias(self) -> str | None:
        if self.alias not in (self.conn.client.list_aliases().get("aliases") or []):
            return None  # (describe_alias would log an error)
        return self._alias_target()

    def _alias_target(self) -> str:
        try:
            return self.conn.client.describe_alias(self.alias)["collection_name"]
        except Exception as e:
            raise SchemaMismatch(f"Milvus alias '{self.alias}' at {self.conn.where} is missing although "
                                 f"'{self.state_name}' exists: the store is incomplete ({e})") from e

    # ----------------------------------------------------------------- following switches

    def refresh(self, force: bool = False) -> StoreSchema | None:
        """The new schema when the alias moved since the last look (None: unchanged). Looks at most
        every ``state_ttl_s`` unless ``force``."""
        now = time.monotonic()
        if not force and now - self._checked_at < self.options.state_ttl_s:
            return None
        target = self._alias_target()
        with self._guard:
            self._checked_at = now
            if target == self.target:
                return None
        schema = stored_schema(self.conn, target, self.conn.client.describe_collection(target))
        with self._guard:
            self.target, self.schema = target, schema
        logger.info("store items now in %s (model %s)", target, schema.model_version)
        return schema

    # ----------------------------------------------------------------- writes

    def fenced(self, write: Callable[[str], None], follow: Callable[[], object]) -> None:
        """Run ``write(collection)`` so that no rebuild by another replica can miss it.

        ``follow`` brings the caller up to date with the alias (MilvusStore.sync) before each try;
        ``write`` raises SchemaMismatch when its rows do not fit the schema it then has.
        """
        while True:
            self.lock.wait_free(self.options.write_wait_s)
            follow()
            target = self.target
            try:
                write(target)
            except SchemaMismatch:
                raise
            except Exception:
                if not self._moved(target):
                    raise
                logger.info("a write met a switch of the store; writing again")
                continue
            if not self._moved(target):
                return
            logger.info("a rebuild began while writing; writing again once it is done")

    def _moved(self, target: str) -> bool:
        """Whether a rebuild began (or ended) since ``target`` was read."""
        return self.lock.busy() or self._alias_target() != target

    # ----------------------------------------------------------------- rebuilds

    @contextmanager
    def rebuilding(self, what: str) -> Iterator[None]:
        """Hold the lock for a rebuild; collections replaced long enough ago are dropped first."""
        self.lock.acquire(what, self.options.rebuild_wait_s)
        try:
            self._forget_retired()
            yield
        finally:
            self.lock.release()

    def switch(self, new: str, schema: StoreSchema) -> None:
        """Point the alias at ``new`` (the commit point), retire the collection it named (caller holds the lock)."""
        old = self.target
        self.conn.client.alter_alias(new, self.alias)
        with self._guard:
            self.target, self.schema, self._checked_at = new, schema, time.monotonic()
        retired = self._retired() + [[old, time.time()]]
        self.conn.client.alter_collection_properties(self.state_name, {PROP_RETIRED: json.dumps(retired)})
        timer = threading.Timer(self.options.retire_grace_s, self._drop_retired)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def _retired(self) -> list[list]:
        props = self.conn.client.describe_collection(self.state_name).get("properties") or {}
        return json.loads(props.get(PROP_RETIRED) or "[]")

    def _drop_retired(self) -> None:
        """Drop every retired collection past its grace that the alias does not name (never the list:
        only the lock holder rewrites it)."""
        try:
            live = self._alias_target()
            for name, at in self._retired():
                if name != live and time.time() - at >= self.options.retire_grace_s \
                        and self.conn.client.has_collection(name):
                    self.conn.forget_pending(name)
                    self.conn.client.drop_collection(name)
                    logger.info("dropped the replaced items collection %s", name)
        except Exception:  # the next rebuild sweeps again
            logger.exception("dropping replaced items collections failed")

    def _forget_retired(self) -> None:
        """Under the lock: drop what is due and keep listing only what still exists."""
        self._drop_retired()
        c = self.conn.client
        kept = [r for r in self._retired() if c.has_collection(r[0])]
        c.alter_collection_properties(self.state_name, {PROP_RETIRED: json.dumps(kept)})

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
