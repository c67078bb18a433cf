"""Per-user interaction history cache (LRU over users, newest events per user), thread-safe."""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict

from fusionrec.retrieval.base import InteractionEvent

HistEntry = tuple  # (ts, pk, InteractionEvent): ordered by (ts, pk)


def _key(e: HistEntry) -> tuple[float, int]:
    return (e[0], e[1])


class HistoryCache:
    """The most recent ``events_per_user`` events of up to ``users`` users.

    ``complete`` stays True until a user is evicted: while it holds, a user absent from the
    cache has no events at all. Users whose list was cut are "truncated": a longer read must
    go to the store. ``generation`` changes on every recorded write, so a reader that fetched
    from the store can tell whether its result is still the latest before caching it.
    """

    def __init__(self, users: int, events_per_user: int) -> None:
        if users < 1 or events_per_user < 1:
            raise ValueError("history cache sizes must be >= 1")
        self._users = int(users)
        self._events = int(events_per_user)
        self._lock = threading.Lock()
        self._hist: OrderedDict[str, list[HistEntry]] = OrderedDict()
        self._truncated: set[str] = set()
        self._complete = True
        self._gen = 0

    def _put(self, user: str, entries: list[HistEntry], replace: bool) -> None:
        """Caller holds the lock. ``entries`` need not be sorted."""
        lst = None if replace else self._hist.get(user)
        if lst is None:
            lst = sorted(entries, key=_key)
            self._hist[user] = lst
            self._truncated.discard(user)
        else:
            for e in entries:
                bisect.insort(lst, e, key=_key)
        self._hist.move_to_end(user)
        if len(lst) > self._events:
            del lst[: len(lst) - self._events]
            self._truncated.add(user)
        while len(self._hist) > self._users:
            evicted, _ = self._hist.popitem(last=False)
            self._truncated.discard(evicted)
            self._complete = False

    def load(self, per_user: dict[str, list[HistEntry]]) -> None:
        """Fill from a full scan; least recently active users first, so eviction drops them."""
        order = sorted(per_user, key=lambda u: max(e[0] for e in per_user[u]))
        with self._lock:
            for u in order:
                self._put(u, per_user[u], replace=True)

    def recorded(self, by_user: dict[str, list[HistEntry]]) -> None:
        """New events just written to the store."""
        with self._lock:
            self._gen += 1
            for user, entries in by_user.items():
                # an uncached user is new when the cache is complete; otherwise their older
                # events live only in the store and lookup() sends the reader there.
                if user in self._hist or self._complete:
                    self._put(user, entries, replace=False)

    def lookup(self, user: str, limit: int) -> tuple[list[InteractionEvent] | None, int]:
        """(the newest ``limit`` events, oldest first, or None when the store must be read; generation)."""
        with self._lock:
            lst = self._hist.get(user)
            if lst is not None:
                self._hist.move_to_end(user)
                if limit <= len(lst) or user not in self._truncated:
                    return [e[2] for e in lst[-limit:]], self._gen
            elif self._complete:
                return [], self._gen
            return None, self._gen

    def fill(self, user: str, entries: list[HistEntry], generation: int) -> None:
        """Cache a user's full history read from the store, unless a write came in between."""
        with self._lock:
            if entries and generation == self._gen:
                self._put(user, list(entries), replace=True)
