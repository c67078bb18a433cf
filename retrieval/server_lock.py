"""A lease lock between the processes sharing one Milvus server: held while collection ``<items>_lock`` exists.

Milvus has no compare-and-set, but creating a collection that exists with other parameters fails
("create duplicate collection with different parameters", probed on 2.3.5), so creating the lock
collection with one's own holder id in its properties succeeds for one holder only. The holder
refreshes ``PROP_BEAT`` every ``lease_s / 3``; a lock whose beat is older than ``lease_s`` was left
by a dead holder and may be broken (dropped) by the next one. Breaking re-reads the holder first,
which leaves a window of a few milliseconds in which two breakers could both proceed; with the
default 30 s lease that needs a holder dead for 30 s and two contenders within those milliseconds.

Writers never take the lock; they wait while it is held (ServerItems.fence).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

from fusionrec.core.errors import Unavailable
from fusionrec.retrieval.connection import MilvusConnection
from fusionrec.retrieval.layout import PROP_FORMAT, PROP_ROLE, STORE_FORMAT, marker_schema

logger = logging.getLogger(__name__)

PROP_LOCK = "fusionrec.lock"  # {"holder": id, "what": purpose}
PROP_BEAT = "fusionrec.lock_beat"  # epoch seconds of the holder's last heartbeat
POLL_S = 0.1


class RebuildLock:
    """The lock collection ``name`` on ``conn``; one instance per store (its own holder id)."""

    def __init__(self, conn: MilvusConnection, name: str, lease_s: float = 30.0) -> None:
        self.conn = conn
        self.name = name
        self.lease_s = float(lease_s)
        self.holder = uuid.uuid4().hex
        self._stop: threading.Event | None = None

    def state(self) -> dict | None:
        """{"holder", "what", "beat"} of the lock as it stands, or None when free."""
        c = self.conn.client
        try:
            if not c.has_collection(self.name):
                return None
            props = c.describe_collection(self.name).get("properties") or {}
        except Exception:
            if c.has_collection(self.name):
                raise
            return None  # released meanwhile
        info = json.loads(props.get(PROP_LOCK) or "{}")
        return info | {"beat": float(props.get(PROP_BEAT) or 0)}

    def busy(self) -> bool:
        """Held by a live holder (a stale lock does not hold writers back)."""
        state = self.state()
        return state is not None and time.time() - state["beat"] < self.lease_s

    def wait_free(self, timeout_s: float) -> None:
        """Return once nobody live holds the lock; Unavailable after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.busy():
            if time.monotonic() >= deadline:
                raise Unavailable("the store is being re-indexed (or an encoder swap committed) by another "
                                  f"replica for longer than {timeout_s:.0f} s; retry")
            time.sleep(POLL_S)

    def acquire(self, what: str, timeout_s: float) -> None:
        """Take the lock (waiting for a live holder, breaking a dead one's); Unavailable after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        props = {PROP_FORMAT: STORE_FORMAT, PROP_ROLE: "lock",
                 PROP_LOCK: json.dumps({"holder": self.holder, "what": what}), PROP_BEAT: repr(time.time())}
        while True:
            state = self.state()
            if state is None:
                try:
                    self.conn.client.create_collection(self.name, schema=marker_schema()[0], properties=props)
                except Exception:  # another holder was faster (other parameters)
                    pass
                if (self.state() or {}).get("holder") == self.holder:
                    break
            elif time.time() - state["beat"] >= self.lease_s:
                self._break(state)
            elif time.monotonic() >= deadline:
                raise Unavailable(f"another replica holds the store's lock ({state}); retry later")
            else:
                time.sleep(POLL_S)
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop,), daemon=True, name="store-lock-beat").start()

    def _break(self, seen: dict) -> None:
        again = self.state()
        if again is not None and again["holder"] == seen["holder"] and again["beat"] == seen["beat"]:
            logger.warning("breaking the store lock of %s (%s): no heartbeat for %.0f s", seen["holder"],
                           seen.get("what"), time.time() - seen["beat"])
            self.conn.client.drop_collection(self.name)

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 3):
            try:
                self.conn.client.alter_collection_properties(self.name, {PROP_BEAT: repr(time.time())})
            except Exception:  # pragma: no cover - the next beat retries; a lapsed lease may be broken
                logger.exception("store lock heartbeat failed")

    def release(self) -> None:
        stop, self._stop = self._stop, None
        if stop is None:
            return
        stop.set()
        if (self.state() or {}).get("holder") == self.holder:
            self.conn.client.drop_collection(self.name)
