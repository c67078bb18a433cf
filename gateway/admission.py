"""Early shedding: refuse a request at once when the work queued ahead of it cannot finish in its deadline.

A `LoadEstimator` per RPC method keeps what the front door already sees: requests in flight, and the
service time per request measured the way the utilisation law does (time with at least one request in
flight, divided by the requests completed in it; over the last `window` completions). A new request is
expected to finish after `(in_flight + 1) x service time`: under saturation that is the queue ahead of it
drained at the measured throughput; with light parallel load it is about one request's latency. It is
shed when that estimate exceeds `headroom` of the caller's remaining deadline, or, when a latency
objective is set, `latency_factor` x the latency of requests that ran alone (recent median). Nothing is
shed while nothing is in flight, nor before `min_samples` completions were measured. Plain Python: no
gRPC, no Ray; `now` is injectable so that tests drive the clock.
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


@dataclass(frozen=True)
class Shed:
    """Why a request was refused: the estimate, the bound it broke and when to retry (seconds)."""

    reason: str
    estimate_s: float
    bound_s: float
    in_flight: int
    retry_after_s: float

    def message(self) -> str:
        bound = "the remaining deadline" if self.reason == DEADLINE_REASON else "the latency objective"
        return (f"overloaded: {self.in_flight} requests in flight; this one would finish in about "
                f"{self.estimate_s * 1000:.0f} ms, beyond {bound} ({self.bound_s * 1000:.0f} ms); "
                f"retry after {self.retry_after_s * 1000:.0f} ms or allow a longer deadline")


@dataclass(frozen=True)
class Ticket:
    """An admitted request: when it started and whether it ran alone (its latency is then a baseline)."""

    started: float
    alone: bool


class LoadEstimator:
    """In-flight count and service time per request of one RPC method; decides whether to shed."""

    def __init__(self, headroom: float = 0.8, latency_factor: float = 0.0, window: int = 64,
                 min_samples: int = 8, max_retry_after_s: float = 5.0,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.headroom = headroom
        self.latency_factor = latency_factor
        self.min_samples = min_samples
        self.max_retry_after_s = max_retry_after_s
        self._now = now
        self.in_flight = 0
        self._busy_s = 0.0  # accumulated time with at least one request in flight, up to _busy_since
        self._busy_since = 0.0
        self._marks: collections.deque[float] = collections.deque(maxlen=window + 1)  # busy time at completions
        self._alone: collections.deque[float] = collections.deque(maxlen=window)  # latencies of lone requests

    def _busy_now(self, now: float) -> float:
        return self._busy_s + (now - self._busy_since if self.in_flight else 0.0)

    def service_time_s(self) -> float | None:
        """Busy time per completed request over the window; None until `min_samples` completed."""
        if len(self._marks) <= self.min_samples:
            return None
        return (self._marks[-1] - self._marks[0]) / (len(self._marks) - 1)

    def alone_latency_s(self) -> float | None:
        """Median latency of recent requests that ran with nothing else in flight."""
        return statistics.median(self._alone) if len(self._alone) >= self.min_samples else None

    def verdict(self, remaining_s: float) -> Shed | None:
        """Shed (why) or None (admit) for a request with ``remaining_s`` of deadline left."""
        service_s = self.service_time_s()
        if not self.in_flight or service_s is None:
            return None
        estimate_s = (self.in_flight + 1) * service_s
        retry_after_s = min(max(self.in_flight * service_s, 0.01), self.max_retry_after_s)
        bound_s = remaining_s * self.headroom
        if estimate_s > bound_s:
            return Shed(DEADLINE_REASON, estimate_s, bound_s, self.in_flight, retry_after_s)
        alone_s = self.alone_latency_s() if self.latency_factor > 0 else None
        if alone_s is not None and estimate_s > self.latency_factor * alone_s:
            return Shed(OBJECTIVE_REASON, estimate_s, self.latency_factor * alone_s, self.in_flight, retry_after_s)
        return None

    def begin(self) -> Ticket:
        now = self._now()
        if not self.in_flight:
            self._busy_since = now
        self.in_flight += 1
        return Ticket(now, self.in_flight == 1)

    def end(self, ticket: Ticket) -> None:
        now = self._now()
        busy = self._busy_now(now)
        self.in_flight -= 1
        self._busy_s, self._busy_since = busy, now
        self._marks.append(busy)
        if ticket.alone and self.in_flight == 0:  # nothing joined it: an unloaded latency
            self._alone.append(now - ticket.started)


class Admission:
    """One LoadEstimator per method, made on first use (only methods with a handler reach here)."""

    def __init__(self, headroom: float, latency_factor: float) -> None:
        self.headroom = headroom
        self.latency_factor = latency_factor
        self.methods: dict[str, LoadEstimator] = {}

    def estimator(self, method: str) -> LoadEstimator:
        found = self.methods.get(method)
        if found is None:
            found = self.methods[method] = LoadEstimator(self.headroom, self.latency_factor)
        return found
