"""Early shedding: refuse a request at once when the work queued ahead of it cannot finish in time.

A `LoadEstimator` per RPC method keeps what the front door already sees: requests in flight, requests
offered (admitted or not) over the last `rate_window_s`, and the service time per request measured the
way the utilisation law does (time with at least one request in flight, divided by the requests
completed in it; over the last `window` completions). A new request is expected to finish after
`(in_flight + 1) x service time`: under saturation that is the queue ahead of it drained at the measured
throughput; with light parallel load it is about one request's latency. Two bounds:

- the deadline, always: shed when that estimate exceeds `headroom` of the caller's remaining deadline;
- the latency objective (`latency_factor` > 0), only while the method is overloaded: shed when the
  estimate exceeds `latency_factor` x the median latency of recent requests that ran alone. This is
  Little's law as a concurrency limit (objective x throughput). Overloaded means both, over the last
  `rate_window_s`: requests offered (admitted or shed) faster than `1 + overload_margin` times the
  capacity seen lately (1 / the best service time of the last `CAPACITY_MEMORY` completions, so that a
  stall behind the front door is not taken for a surge), and faster than `1 + overload_margin` times
  they completed, by more than `OVERLOAD_STEP` requests (a queue that grows now). Callers that wait for their answers
  (closed loop, however many) offer no more than completes, so they are not shed by it and the
  deployments behind still see all their queued work (what Serve's autoscaling counts); an open-loop
  surge beyond capacity is cut down to the concurrency that keeps the objective. The second test
  matters with several Gateway replicas: each measures its own share of the deployments' capacity, so
  when one replica dies its callers reach a survivor whose capacity estimate still holds its old share
  (for `window` completions), yet their answers come back as fast as they arrive.

A surge after an idle pause: the offered rate is taken over the time the window's arrivals cover (at
least `MIN_RATE_SPAN_S`), not the whole window, which took ~1 s to see a 2x surge (its first calls then
queued ~0.5 s of work on 2 cores and set the surge's p99). Whatever was admitted before the surge was seen
is still queued when it is, so once a request is shed by the objective, the requests admitted last beyond
the objective's concurrency (when more than `OVERLOAD_STEP` beyond it) are dropped from the queue too
(`excess`): the front door cancels their work and answers them RESOURCE_EXHAUSTED. A CoDel-like drop from
the tail, only while overloaded: a failover never reaches it, nor do up to `OVERLOAD_STEP` callers that
wait for their answers; N > `OVERLOAD_STEP` of them starting together after a pause look like an open-loop
surge until 5 x (N - `OVERLOAD_STEP`) answers came back (the growth test with the 0.2 margin).

Nothing is shed while nothing is in flight (by the objective: while fewer than `OBJECTIVE_MIN_IN_FLIGHT`),
nor before `min_samples` completions were measured. Plain
Python: no gRPC, no Ray; `now` is injectable so that tests drive the clock.
"""

from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass
from typing import Callable

#: Reasons a request is shed, as counted in fusionrec_rejected_requests_total{reason}.
DEADLINE_REASON = "deadline_unreachable"
OBJECTIVE_REASON = "latency_objective"
QUEUED_REASON = "latency_objective_queued"  # admitted, then dropped from the queue once the surge was seen

_MAX_ARRIVALS = 16_384  # arrival times kept for the offered rate (bounds memory under a flood)
#: The objective never holds a method below this many requests in flight: measured one at a time, the
#: service time is the lone latency itself, so a factor near 2 would otherwise never let a second request
#: in to show that two overlap (2 callers here: +40 % throughput for +45 % latency, reports/reliability-rerun.json).
OBJECTIVE_MIN_IN_FLIGHT = 2
#: Requests offered beyond what completed (and the margin) in the rate window before it counts as overload:
#: a few callers arriving together (those of a lost Gateway replica, with their retried attempts) are a
#: step, not a queue that keeps growing; a 2x open-loop surge passes it within a fraction of a second.
OVERLOAD_STEP = 8
#: The shortest span an offered rate is taken over: right after an idle pause, a burst of this many seconds of
#: the measured capacity x (1 + margin) (~24 requests here) is the least that reads as overload; fewer callers
#: arriving together (a failover's) never do.
MIN_RATE_SPAN_S = 0.5
#: Completions over which the overload test remembers the best service time (the capacity it compares the
#: offered rate with): a stall of the deployments behind (0.5 s while a swap re-fitted the fusion model, at 20 %
#: load) inflates the recent service time, and the rate test then read 20 % of the capacity as overload
#: (`fusionrec bench swap`, 2026-12-01: 40 calls shed).
CAPACITY_MEMORY = 512


@dataclass(frozen=True)
class Shed:
    """Why a request was refused: the estimate, the bound it broke and when to retry (seconds)."""

    reason: str
    estimate_s: float
    bound_s: float
    in_flight: int
    retry_after_s: float

    def message(self) -> str:
        if self.reason == QUEUED_REASON:
            return (f"overloaded: dropped from the queue after {self.estimate_s * 1000:.0f} ms: a surge "
                    f"queued {self.in_flight} requests, beyond the latency objective's concurrency; "
                    f"retry after {self.retry_after_s * 1000:.0f} ms")
        bound = "the remaining deadline" if self.reason == DEADLINE_REASON else "the latency objective"
        return (f"overloaded: {self.in_flight} requests in flight; this one would finish in about "
                f"{self.estimate_s * 1000:.0f} ms, beyond {bound} ({self.bound_s * 1000:.0f} ms); "
                f"retry after {self.retry_after_s * 1000:.0f} ms or allow a longer deadline")


@dataclass(eq=False)
class Ticket:
    """An admitted request: when it started, whether it ran alone (its latency is then a baseline) and
    whether it was dropped from the queue (`LoadEstimator.excess`: not a completion)."""

    started: float
    alone: bool
    dropped: bool = False


class LoadEstimator:
    """In-flight count, offered rate and service time per request of one RPC method; decides whether to shed."""

    def __init__(self, headroom: float = 0.8, latency_factor: float = 0.0, overload_margin: float = 0.2,
                 rate_window_s: float = 2.0, window: int = 64, min_samples: int = 8,
                 max_retry_after_s: float = 5.0, now: Callable[[], float] = time.monotonic) -> None:
        self.headroom = headroom
        self.latency_factor = latency_factor
        self.overload_margin = overload_margin
        self.rate_window_s = rate_window_s
        self.min_samples = min_samples
        self.max_retry_after_s = max_retry_after_s
        self._now = now
        self.in_flight = 0
        self._busy_s = 0.0  # accumulated time with at least one request in flight, up to _busy_since
        self._busy_since = 0.0
        self._marks: collections.deque[float] = collections.deque(maxlen=window + 1)  # busy time at completions
        self._alone: collections.deque[float] = collections.deque(maxlen=window)  # latencies of lone requests
        self._arrivals: collections.deque[float] = collections.deque(maxlen=_MAX_ARRIVALS)
        self._completions: collections.deque[float] = collections.deque(maxlen=_MAX_ARRIVALS)
        self._admitted: dict[Ticket, None] = {}  # in flight, oldest first
        self._completed = 0
        self._best: collections.deque[tuple[int, float]] = collections.deque()  # (completion, service_s), rising

    def _busy_now(self, now: float) -> float:
        return self._busy_s + (now - self._busy_since if self.in_flight else 0.0)

    def service_time_s(self) -> float | None:
        """Busy time per completed request over the window; None until `min_samples` completed."""
        if len(self._marks) <= self.min_samples:
            return None
        return (self._marks[-1] - self._marks[0]) / (len(self._marks) - 1)

    def best_service_time_s(self) -> float | None:
        """The lowest `service_time_s` of the last `CAPACITY_MEMORY` completions: the capacity seen lately."""
        return self._best[0][1] if self._best else None

    def _remember_service_time(self) -> None:
        service_s = self.service_time_s()
        if service_s is None:
            return
        while self._best and self._best[-1][1] >= service_s:
            self._best.pop()
        self._best.append((self._completed, service_s))
        while self._best[0][0] <= self._completed - CAPACITY_MEMORY:
            self._best.popleft()

    def alone_latency_s(self) -> float | None:
        """Median latency of recent requests that ran with nothing else in flight."""
        return statistics.median(self._alone) if len(self._alone) >= self.min_samples else None

    def _recent(self, times: collections.deque[float]) -> int:
        """How many of ``times`` fall in the last `rate_window_s` (older ones are dropped)."""
        cutoff = self._now() - self.rate_window_s
        while times and times[0] < cutoff:
            times.popleft()
        return len(times)

    def _span_s(self) -> float:
        """The time the offered requests in the window cover: the whole window under steady traffic, less
        after an idle pause (at least `MIN_RATE_SPAN_S`), so that a surge's rate is seen as it arrives."""
        self._recent(self._arrivals)
        covered = self._now() - self._arrivals[0] if self._arrivals else self.rate_window_s
        return min(max(covered, MIN_RATE_SPAN_S), self.rate_window_s)

    def offered_qps(self) -> float:
        """Requests offered (admitted or shed) per second over the last `rate_window_s` (or less: `_span_s`)."""
        return self._recent(self._arrivals) / self._span_s()

    def completed_qps(self) -> float:
        """Requests completed per second over the same span as `offered_qps`."""
        return self._recent(self._completions) / self._span_s()

    def overloaded(self) -> bool:
        """Requests arrive faster than the capacity seen lately can serve and than they are answered (a queue
        that grows)."""
        best_s = self.best_service_time_s()
        limit = 1.0 + self.overload_margin
        growth = self._recent(self._arrivals) - limit * self._recent(self._completions)  # beyond the margin
        return best_s is not None and self.offered_qps() * best_s > limit and growth > OVERLOAD_STEP

    def verdict(self, remaining_s: float) -> Shed | None:
        """Shed (why) or None (admit) for a request with ``remaining_s`` of deadline left; counts it as offered."""
        self._arrivals.append(self._now())
        service_s = self.service_time_s()
        if not self.in_flight or service_s is None:
            return None
        estimate_s = (self.in_flight + 1) * service_s
        retry_after_s = self._retry_after_s(service_s)
        bound_s = remaining_s * self.headroom
        if estimate_s > bound_s:
            return Shed(DEADLINE_REASON, estimate_s, bound_s, self.in_flight, retry_after_s)
        alone_s = self.alone_latency_s() if self.latency_factor > 0 else None
        if (alone_s is not None and self.in_flight >= OBJECTIVE_MIN_IN_FLIGHT
                and estimate_s > self.latency_factor * alone_s and self.overloaded()):
            return Shed(OBJECTIVE_REASON, estimate_s, self.latency_factor * alone_s, self.in_flight, retry_after_s)
        return None

    def _retry_after_s(self, service_s: float) -> float:
        """When to come back: the queue in flight drained at ``service_s`` per request (10 ms at least)."""
        return min(max(self.in_flight * service_s, 0.01), self.max_retry_after_s)

    def excess(self) -> list[Ticket]:
        """Right after a request was shed by the objective (overload confirmed): the requests admitted last
        beyond the objective's concurrency, if more than `OVERLOAD_STEP` beyond it; they are marked dropped."""
        service_s, alone_s = self.service_time_s(), self.alone_latency_s()
        if not service_s or alone_s is None or self.latency_factor <= 0:
            return []
        keep = max(OBJECTIVE_MIN_IN_FLIGHT, int(self.latency_factor * alone_s / service_s))
        live = [t for t in self._admitted if not t.dropped]
        if len(live) <= keep + OVERLOAD_STEP:
            return []
        for ticket in live[keep:]:
            ticket.dropped = True
        return live[keep:]

    def dropped(self, ticket: Ticket) -> Shed:
        """What to tell the caller of a request `excess` dropped: how long it waited, the queue it was in."""
        service_s = self.service_time_s() or 0.0
        retry_after_s = self._retry_after_s(service_s)
        return Shed(QUEUED_REASON, self._now() - ticket.started, 0.0, self.in_flight, retry_after_s)

    def begin(self) -> Ticket:
        now = self._now()
        if not self.in_flight:
            self._busy_since = now
        self.in_flight += 1
        ticket = Ticket(now, self.in_flight == 1)
        self._admitted[ticket] = None
        return ticket

    def end(self, ticket: Ticket) -> None:
        now = self._now()
        busy = self._busy_now(now)
        self.in_flight -= 1
        self._admitted.pop(ticket, None)
        self._busy_s, self._busy_since = busy, now
        if ticket.dropped:  # its work was cancelled: no completion (the queue it was part of still grows)
            return
        self._marks.append(busy)
        self._completed += 1
        self._remember_service_time()
        self._completions.append(now)
        if ticket.alone and self.in_flight == 0:  # nothing joined it: an unloaded latency
            self._alone.append(now - ticket.started)


class Admission:
    """One LoadEstimator per method, made on first use (only methods with a handler reach here)."""

    def __init__(self, headroom: float, latency_factor: float, overload_margin: float = 0.2) -> None:
        self.headroom = headroom
        self.latency_factor = latency_factor
        self.overload_margin = overload_margin
        self.methods: dict[str, LoadEstimator] = {}

    def estimator(self, method: str) -> LoadEstimator:
        found = self.methods.get(method)
        if found is None:
            found = self.methods[method] = LoadEstimator(self.headroom, self.latency_factor, self.overload_margin)
        return found
