"""Request orchestration: fan out to encoders under the deadline, fuse, retrieve, rank.

Works on domain types and Serve DeploymentHandles; knows nothing of protobuf.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np

from fusionrec.encoders.base import InvalidContent
from fusionrec.gateway.config import LimitsConfig, ServerConfig
from fusionrec.gateway.domain import (InteractionEvent, ItemInput, ItemView, Ranked, Recommendation,
                            RecommendQuery, ScoredItem)
from fusionrec.core.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from fusionrec.retrieval.base import SchemaMismatch, StoredItem
from fusionrec.gateway.validation import check_id, check_interactions, check_items, check_recommend

BYO_VERSION = "byo"


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
                 limits: LimitsConfig, server: ServerConfig) -> None:
        self.encoders = encoders
        self.fusion = fusion
        self.retrieval = retrieval
        self.limits = limits
        self.reserve_s = server.ranking_reserve_ms / 1000
        self.encoder_versions: dict[str, str] = {}
        self.modality_dims: dict[str, int] = {}
        self.model_version = ""

    async def load(self) -> None:
        """Wait until every deployment has loaded its model, and learn versions and dims."""
        infos = await asyncio.gather(*(h.info.remote() for h in self.encoders.values()))
        self.encoder_versions = {m: info["version"] for m, info in zip(self.encoders, infos)}
        store_info = await self.retrieval.info.remote()
        self.modality_dims = dict(store_info["modality_dims"])
        # The store's fused vectors decide which fusion model scores requests (see `fusionrec reindex`).
        self.model_version = store_info["model_version"]

    # ---- Recommend ----

    async def recommend(self, q: RecommendQuery, deadline: float) -> Recommendation:
        """deadline: absolute time.monotonic() by which the answer must be sent."""
        check_recommend(q, self.limits)
        stages = _Stages()
        results = await asyncio.gather(*(self._encode_query(m, c, deadline) for m, c in q.query.by_modality.items()))
        results = dict(zip(q.query.by_modality, results))
        query = {m: vec for m, (vec, _) in results.items() if vec is not None}
        dropped = {m: why for m, (vec, why) in results.items() if vec is None}
        if q.query.by_modality:
            stages.mark("encode")
        self._check_deadline(deadline, "retrieval")
        # Nothing personal to go on (no history; no query, or none encoded in time): popular items.
        ranked = await self.retrieval.recommend.remote(q, query, self.model_version, self.limits.max_history)
        if ranked is None:  # re-indexed with another fusion model meanwhile: follow it, once
            await self.load()
            ranked = await self.retrieval.recommend.remote(q, query, self.model_version, self.limits.max_history)
        if ranked is None:
            raise Unavailable("the store is being re-indexed with a new fusion model; retry")
        stages.mark("retrieve_and_rank")
        items = [ScoredItem(item_id=c.item_id, score=float(score),
                            contributions={m: float(v[i]) for m, v in ranked.contributions.items()},
                            attributes=c.attributes)
                 for i, (c, score) in enumerate(zip(ranked.candidates, ranked.scores))]
        items.sort(key=lambda it: -it.score)
        return Recommendation(
            items=items, request_id=uuid.uuid4().hex,
            modalities_used=_basis(ranked) + sorted(query),
            modalities_dropped=dropped, model_version=self.model_version,
            encoder_versions=dict(self.encoder_versions),
            timings_ms=stages.ms if q.debug_timings else {})

    async def _encode_query(self, modality: str, content: Any, deadline: float) -> tuple[np.ndarray | None, str]:
        """One query modality: (vector, "") or (None, why it was dropped)."""
        if modality not in self.encoders:
            raise InvalidArgument(f"query.{modality}: no {modality} encoder is configured")
        timeout_s = deadline - time.monotonic() - self.reserve_s
        if timeout_s <= 0:
            return None, "deadline reached before encoding"
        response = self.encoders[modality].encode.remote(content)
        try:
            return await asyncio.wait_for(_awaited(response), timeout_s), ""
        except asyncio.TimeoutError:
            response.cancel()
            return None, f"deadline: encoder took longer than {timeout_s * 1000:.0f} ms"
        except InvalidContent as err:
            raise InvalidArgument(f"query.{modality}: {err.reason}") from None
        except Exception as err:  # an encoder failure degrades the answer, never fails it
            return None, f"encoder error: {type(err).__name__}"

    @staticmethod
    def _check_deadline(deadline: float, stage: str) -> None:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"deadline exceeded before {stage}; allow more time")

    # ---- Items ----

    async def upsert(self, items: list[ItemInput]) -> int:
        """Encode, fuse and store a batch; all or nothing."""
        check_items(items, self.limits, self.modality_dims, set(self.encoders))
        versions = self._vector_versions(items)
        # One call per modality: the encoder replica batches the contents itself.
        by_modality: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            for m in item.content.by_modality:
                by_modality.setdefault(m, []).append(i)
        modalities = list(by_modality)
        replies = await asyncio.gather(
            *(self.encoders[m].encode_many.remote([items[i].content.by_modality[m] for i in by_modality[m]])
              for m in modalities), return_exceptions=True)
        vectors = [dict(item.vectors) for item in items]
        for m, reply in zip(modalities, replies):
            if isinstance(reply, BaseException):
                raise Unavailable(f"the {m} encoder failed ({type(reply).__name__}); nothing was stored, retry")
            for i, result in zip(by_modality[m], reply):
                if isinstance(result, InvalidContent):
                    raise InvalidArgument(f"items[{i}] ({items[i].item_id!r}) content.{m}: {result.reason}")
                vectors[i][m] = result
                versions[i][m] = self.encoder_versions[m]
        for attempt in (1, 2):
            version = self.model_version
            fused = await self.fusion.item_vectors.remote(vectors, [item.item_id for item in items], version)
            stored = [StoredItem(item_id=item.item_id, attributes=item.attributes, modality_vectors=vectors[i],
                                 fused=fused[i], encoder_versions=versions[i], model_version=version)
                      for i, item in enumerate(items)]
            try:
                # the raw content goes along: the Retrieval replica keeps it (content retention)
                return await self.retrieval.upsert.remote(stored, [dict(item.content.by_modality) for item in items])
            except SchemaMismatch:
                if attempt == 2:
                    raise
                await self.load()  # re-indexed meanwhile: fuse again with the store's model
        raise AssertionError("unreachable")

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
        for i, item_id in enumerate(item_ids):
            check_id(item_id, f"item_ids[{i}]", self.limits)
        if not item_ids:
            raise InvalidArgument("item_ids must not be empty")
        deleted = await self.retrieval.delete.remote(item_ids)
        return len(deleted), [i for i in item_ids if i not in set(deleted)]

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
