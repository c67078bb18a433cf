"""Request orchestration: fan out to encoders under the deadline, fuse, retrieve, rank.

Works on domain types and Serve DeploymentHandles; knows nothing of protobuf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Callable

import numpy as np

from fusionrec.encoders.base import InvalidContent
from fusionrec.gateway import tracing
from fusionrec.gateway.config import LimitsConfig, ServerConfig
from fusionrec.gateway.metrics import NO_METRICS, Metrics, NoMetrics, timed
from fusionrec.gateway.domain import (InteractionEvent, ItemInput, ItemView, QueryContent, Ranked, Recommendation,
                            RecommendQuery, ScoredItem)
from fusionrec.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from fusionrec.retrieval.base import SchemaMismatch, StoredItem
from fusionrec.gateway.requestlog import current_request_id
from fusionrec.gateway.routing import EncoderRoutes
from fusionrec.gateway.validation import check_id, check_interactions, check_items, check_recommend

BYO_VERSION = "byo"
#: How often the Gateway re-reads versions (model, encoders) and encoder swaps in progress.
REFRESH_PERIOD_S = 2.0
REFRESH_TIMEOUT_S = 10.0
log = logging.getLogger("ray.serve")


async def _awaited(response: Any) -> Any:
    return await response


class _Stages:
    """Per-stage wall times in milliseconds."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = (now - self._t) * 1000
        self._t = now


def _basis(ranked: Ranked) -> list[str]:
    """What the ranking rests on besides query content: the user's history, or popularity."""
    return ["popular"] if ranked.popular else ["history"] if ranked.used_history else []


class Recommender:
    """The fusionrec service logic over handles to the encoder, fusion and retrieval deployments."""

    def __init__(self, encoders: dict[str, Any], fusion: Any, retrieval: Any,
                 limits: LimitsConfig, server: ServerConfig, app_name: str = "fusionrec",
                 metrics: Metrics | NoMetrics = NO_METRICS) -> None:
        self.encoders = encoders
        self.metrics = metrics  # stage latencies, dropped modalities (gateway/metrics.py)
        self.routes = EncoderRoutes(encoders, app_name)
        self.fusion = fusion
        self.retrieval = retrieval
        self.limits = limits
        self.reserve_s = server.ranking_reserve_ms / 1000
        self.encode_share = server.encode_budget_share
        #: Deployment name -> whether health reports it without a live replica (gateway/health.py's
        #: HealthWatcher.is_down once the front door is open): such an encoder is skipped, not waited for.
        self.down: Callable[[str], bool] = lambda _name: False
        self.encoder_versions: dict[str, str] = {}  # of the encoders in use (routes)
        self.store_versions: dict[str, str] = {}  # of the stored vectors
        self.modality_dims: dict[str, int] = {}
        self.model_version = ""
        self._load_lock = asyncio.Lock()
        self._loads_begun = 0  # loads begun so far; the number of the last one finished:
        self._load_finished = 0

    async def load(self, after: int | None = None) -> None:
        """Wait until every deployment has loaded its model, and learn versions, dims and which
        encoder serves each modality (gateway/routing.py). One at a time: a refresh that read the store
        before a switch must not finish after (and overwrite) one that read it after.

        ``after`` (``self._loads_begun`` when the caller met a switch): nothing to do once a load begun
        after that has finished. Every request in flight meets a switch at once, and one load each, in
        turn, queued them behind each other for seconds (`fusionrec bench swap`, the commit)."""
        async with self._load_lock:
            if after is not None and self._load_finished > after:
                return
            self._loads_begun += 1
            number = self._loads_begun
            await self._load()
            self._load_finished = number

    async def _load(self) -> None:
        infos = await asyncio.gather(*(h.info.remote() for h in self.encoders.values()))
        store_info, swaps = await asyncio.gather(self.retrieval.info.remote(), self.retrieval.swaps.remote())
        own = {m: info["version"] for m, info in zip(self.encoders, infos)}
        await self.routes.refresh(own, store_info["encoder_versions"], swaps)
        self.encoder_versions = dict(self.routes.versions)
        self.store_versions = dict(store_info["encoder_versions"])
        self.modality_dims = dict(store_info["modality_dims"])
        # The store's fused vectors decide which fusion model scores requests (see `fusionrec reindex`).
        self.model_version = store_info["model_version"]

    async def refresh_forever(self, period_s: float = REFRESH_PERIOD_S) -> None:
        """Follow re-indexes and encoder swaps even when no request runs into them."""
        while True:
            await asyncio.sleep(period_s)
            try:  # bounded: a deployment without a replica must not hold the load lock forever
                await asyncio.wait_for(self.load(), REFRESH_TIMEOUT_S)
            except Exception as err:  # a restarting deployment: keep the routes, try again
                log.warning("refreshing versions failed: %r", err)

    # ---- Recommend ----

    async def recommend(self, q: RecommendQuery, deadline: float) -> Recommendation:
        """deadline: absolute time.monotonic() by which the answer must be sent."""
        check_recommend(q, self.limits)
        stages = _Stages()
        # Retrieval needs the encoded query only: the raw content (up to the message limit) stays here.
        without_content = dataclasses.replace(q, query=QueryContent())
        for _ in range(3):  # a switch (re-index, encoder swap) met halfway: follow it and encode again
            query, versions, dropped = await self._encode_all(q, deadline)
            if q.query.by_modality:
                stages.mark("encode")
            self._check_deadline(deadline, "retrieval")
            # Nothing personal to go on (no history; no query, or none encoded in time): popular items.
            with tracing.stage("retrieve_and_rank"):  # history, user tower, search, attribution: one hop
                ranked = await self.retrieval.recommend.remote(without_content, query, self.model_version,
                                                               self.limits.max_history, versions)
            if ranked is not None:
                break
            await self.load(self._loads_begun)  # re-indexed, or an encoder swap committed, meanwhile: follow it
        if ranked is None:
            self._raise_stale(versions)
        stages.mark("retrieve_and_rank")
        self.metrics.observe_stages("Recommend", stages.ms)
        self.metrics.observe_dropped(dropped)
        items = [ScoredItem(item_id=c.item_id, score=float(score),
                            contributions={m: float(v[i]) for m, v in ranked.contributions.items()},
                            attributes=c.attributes)
                 for i, (c, score) in enumerate(zip(ranked.candidates, ranked.scores))]
        items.sort(key=lambda it: -it.score)
        return Recommendation(
            items=items, request_id=current_request_id(),
            modalities_used=_basis(ranked) + sorted(query),
            modalities_dropped=dropped, model_version=self.model_version,
            encoder_versions=dict(self.encoder_versions),
            timings_ms=stages.ms if q.debug_timings else {})

    async def _encode_all(self, q: RecommendQuery, deadline: float
                          ) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
        """Every query modality concurrently: (vectors, their encoder versions, dropped -> why)."""
        versions = {m: self.routes.versions.get(m, "") for m in q.query.by_modality}
        results = await asyncio.gather(*(timed(self.metrics, "Recommend", f"encode_{m}",
                                               self._encode_query(m, c, deadline))
                                         for m, c in q.query.by_modality.items()))
        results = dict(zip(q.query.by_modality, results))
        query = {m: vec for m, (vec, _) in results.items() if vec is not None}
        dropped = {m: why for m, (vec, why) in results.items() if vec is None}
        return query, {m: versions[m] for m in query}, dropped

    def _raise_stale(self, versions: dict[str, str]) -> None:
        """Retrieval refused twice: say which version disagrees with the store."""
        stale = {m: v for m, v in versions.items() if v != self.store_versions.get(m, v)}
        if stale:
            raise FailedPrecondition(
                "query encoder versions " + ", ".join(f"{m} {v!r}" for m, v in stale.items()) + " do not match "
                f"the stored vectors ({ {m: self.store_versions[m] for m in stale} }): swap the encoder with "
                "`fusionrec encoders swap` instead of changing it in place")
        raise Unavailable("the store is being re-indexed with a new fusion model; retry")

    async def _encode_query(self, modality: str, content: Any, deadline: float) -> tuple[np.ndarray | None, str]:
        """One query modality: (vector, "") or (None, why it was dropped)."""
        if modality not in self.encoders:
            raise InvalidArgument(f"query.{modality}: no {modality} encoder is configured")
        if self._unavailable(modality):
            return None, f"unavailable: the {modality} encoder has no live replica"
        remaining_s = deadline - time.monotonic()
        # Retrieval keeps at least ranking_reserve_ms and (1 - encode_budget_share) of what is left.
        timeout_s = remaining_s - max(self.reserve_s, remaining_s * (1 - self.encode_share))
        if timeout_s <= 0:
            return None, "deadline reached before encoding"
        with tracing.stage(f"encode.{modality}", timeout_ms=round(timeout_s * 1000)) as span:
            vec, why = await self._call_encoder(modality, content, timeout_s)
            if why:
                span.set_attribute("fusionrec.dropped", why)
            return vec, why

    def _unavailable(self, modality: str) -> bool:
        """The app's own encoder serves this modality and health reports it without a live replica."""
        handle = self.routes.active[modality]
        return handle is self.encoders.get(modality) and self.down(getattr(handle, "deployment_name", ""))

    async def _call_encoder(self, modality: str, content: Any, timeout_s: float) -> tuple[np.ndarray | None, str]:
        response = self.routes.active[modality].encode.remote(content)
        try:
            return await asyncio.wait_for(_awaited(response), timeout_s), ""
        except asyncio.TimeoutError:
            response.cancel()
            return None, f"deadline: encoder took longer than {timeout_s * 1000:.0f} ms"
        except asyncio.CancelledError:  # the caller left, or admission dropped the request: free the encoder
            response.cancel()
            raise
        except InvalidContent as err:
            raise InvalidArgument(f"query.{modality}: {err.reason}") from None
        except Exception as err:  # an encoder failure degrades the answer, never fails it
            if type(err).__name__ == "BackPressureError":  # its queue is full (max_queued_requests)
                return None, "overloaded: the encoder's queue is full"
            return None, f"encoder error: {type(err).__name__}"

    @staticmethod
    def _check_deadline(deadline: float, stage: str) -> None:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"deadline exceeded before {stage}; allow more time")

    # ---- Items ----

    async def upsert(self, items: list[ItemInput]) -> int:
        """Encode, fuse and store a batch; all or nothing."""
        check_items(items, self.limits, self.modality_dims, set(self.encoders))
        contents = [dict(item.content.by_modality) for item in items]  # kept by Retrieval (content retention)
        for attempt in (1, 2):
            stages = _Stages()
            versions = self._vector_versions(items)
            with tracing.stage("encode", items=len(items)):
                vectors, shadow = await self._encode_items(items, versions)
            stages.mark("encode")
            version = self.model_version
            with tracing.stage("fuse"):
                fused = await self.fusion.item_vectors.remote(vectors, [item.item_id for item in items], version)
            stages.mark("fuse")
            stored = [StoredItem(item_id=item.item_id, attributes=item.attributes, modality_vectors=vectors[i],
                                 fused=fused[i], encoder_versions=versions[i], model_version=version)
                      for i, item in enumerate(items)]
            try:
                with tracing.stage("store"):
                    n = await self.retrieval.upsert.remote(stored, contents, shadow)
                stages.mark("store")
                self.metrics.observe_stages("UpsertItems", stages.ms)
                return n
            except SchemaMismatch:
                if attempt == 2:
                    raise
                await self.load(self._loads_begun)  # re-indexed or an encoder swapped meanwhile: encode, fuse again
        raise AssertionError("unreachable")

    async def _encode_items(self, items: list[ItemInput], versions: list[dict[str, str]]
                            ) -> tuple[list[dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
        """Per item, modality -> vector (bring-your-own ones included; ``versions`` filled in), and
        during an encoder swap the incoming encoder's vectors: modality -> item id -> vector."""
        by_modality: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            for m in item.content.by_modality:
                by_modality.setdefault(m, []).append(i)
        # The routes as they are now: a refresh during the awaits below replaces them (a swap switching over).
        active, in_use, shadows = self.routes.active, self.routes.versions, self.routes.shadow
        # One call per modality and encoder: the encoder replica batches the contents itself.
        calls = [(m, h, is_active) for m in by_modality
                 for h, is_active in ((active[m], True), (shadows.get(m), False)) if h is not None]
        replies = await asyncio.gather(
            *(h.encode_many.remote([items[i].content.by_modality[m] for i in by_modality[m]]) for m, h, _ in calls),
            return_exceptions=True)
        vectors = [dict(item.vectors) for item in items]
        shadow: dict[str, dict[str, np.ndarray]] = {}
        for (m, _, is_active), reply in zip(calls, replies):
            if isinstance(reply, BaseException):
                raise Unavailable(f"the {m} encoder failed ({type(reply).__name__}); nothing was stored, retry")
            for i, result in zip(by_modality[m], reply):
                if isinstance(result, InvalidContent):
                    raise InvalidArgument(f"items[{i}] ({items[i].item_id!r}) content.{m}: {result.reason}")
                if is_active:
                    vectors[i][m], versions[i][m] = result, in_use[m]
                else:
                    shadow.setdefault(m, {})[items[i].item_id] = result
        return vectors, shadow

    def _vector_versions(self, items: list[ItemInput]) -> list[dict[str, str]]:
        """Versions of bring-your-own vectors; refuses vectors from another encoder than ours."""
        out = []
        for i, item in enumerate(items):
            versions = {}
            for m in item.vectors:
                given = item.vector_versions.get(m, "")
                if m in self.encoder_versions and given != self.encoder_versions[m]:
                    raise InvalidArgument(
                        f"items[{i}] ({item.item_id!r}): a {m} vector must carry encoder_version "
                        f"{self.encoder_versions[m]!r} (the server's {m} encoder), got {given!r}; "
                        "vectors from different encoders are not comparable")
                versions[m] = given or BYO_VERSION
            out.append(versions)
        return out

    async def delete(self, item_ids: list[str]) -> tuple[int, list[str]]:
        if not item_ids:
            raise InvalidArgument("item_ids must not be empty")
        if len(item_ids) > self.limits.max_delete_batch:
            raise InvalidArgument(f"{len(item_ids)} item_ids in one call; the limit is {self.limits.max_delete_batch}: "
                                  "split the batch")
        for i, item_id in enumerate(item_ids):
            check_id(item_id, f"item_ids[{i}]", self.limits)
        deleted = set(await self.retrieval.delete.remote(item_ids))
        return len(deleted), [i for i in item_ids if i not in deleted]

    async def get(self, item_id: str) -> ItemView:
        check_id(item_id, "item_id", self.limits)
        found = await self.retrieval.get.remote([item_id])
        if item_id not in found:
            raise NotFound(f"item {item_id!r} does not exist")
        item = found[item_id]
        return ItemView(item_id=item.item_id, attributes=item.attributes,
                        modalities=sorted(item.modality_vectors), encoder_versions=item.encoder_versions,
                        model_version=item.model_version, content_kept=sorted(item.content or {}))

    async def record(self, events: list[InteractionEvent]) -> int:
        check_interactions(events, self.limits)
        now = time.time()
        for e in events:
            e.timestamp_s = e.timestamp_s or now
        return await self.retrieval.record_interactions.remote(events)
