"""Ray Serve deployments: thin wrappers (batching, placement, readiness) around plain classes."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from dataclasses import asdict, replace
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from fusionrec.encoders.base import InvalidContent
from fusionrec.encoders.registry import get_encoder
from fusionrec.fusion.registry import get_fusion_model
from fusionrec.gateway.config import AppConfig, EncoderConfig, FusionConfig, StoreConfig
from fusionrec.core.errors import FailedPrecondition, InvalidArgument, NotFound
from fusionrec.gateway.domain import Ranked, RecommendQuery
from fusionrec.retrieval.base import InteractionEvent, StoredItem, StoreSchema

log = logging.getLogger("ray.serve")  # lands in the replica log files


SETTLE_EVERY_ITEMS = 20_000


def settle_heap() -> None:
    """Collect, then freeze everything alive (models, the store's indexes) out of the cyclic GC.

    A full collection walks every tracked container: ~90 ms at 50k stored items in the Retrieval
    replica, landing on whichever requests are in flight (p99). Frozen objects are still freed
    by reference counting; only cycles among them would outlive the freeze.
    """
    gc.collect()
    gc.freeze()


@serve.deployment
class EncoderDeployment:
    """One modality encoder behind @serve.batch; a bad input fails only its own request."""

    def __init__(self, modality: str, config: dict) -> None:
        cfg = EncoderConfig.model_validate(config)
        self.encoder = get_encoder(cfg.name, **cfg.options)
        if self.encoder.modality != modality:
            raise ValueError(f"encoder {cfg.name!r} encodes {self.encoder.modality}, not {modality}")
        self.encoder.warmup()
        settle_heap()

    def reconfigure(self, user_config: dict) -> None:
        self._encode_batch.set_max_batch_size(int(user_config.get("max_batch_size", 32)))
        self._encode_batch.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.005)))

    def info(self) -> dict[str, Any]:
        e = self.encoder
        return {"name": e.name, "version": e.version, "modality": e.modality, "dim": e.dim}

    async def encode(self, content: str | bytes) -> np.ndarray:
        """One input -> (dim,) float32 unit vector; raises InvalidContent for bad input."""
        result = await self._encode_batch(content)
        if isinstance(result, Exception):
            raise result
        return result

    async def encode_many(self, contents: list[str | bytes]) -> list[np.ndarray | InvalidContent]:
        """Several inputs in one call (one hop for a whole upsert); they join the same batches.

        Returns per input a (dim,) vector or the InvalidContent it raised.
        """
        return list(await asyncio.gather(*(self._encode_batch(c) for c in contents)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, contents: list[str | bytes]) -> list[np.ndarray | InvalidContent]:
        # Off the event loop, so the next batch queues up while this one runs.
        return await asyncio.to_thread(self._encode_isolated, contents)

    def _encode_isolated(self, contents: list[str | bytes]) -> list[np.ndarray | InvalidContent]:
        out: list[Any] = [None] * len(contents)
        prepared, positions = [], []
        for i, content in enumerate(contents):
            try:
                prepared.append(self.encoder.prepare(content))
                positions.append(i)
            except InvalidContent as err:
                out[i] = err
        if prepared:
            for i, vec in zip(positions, self.encoder.embed(prepared)):
                out[i] = vec
        return out


async def _modality_dims(encoders: dict[str, DeploymentHandle], precomputed: dict[str, int]) -> tuple[dict, dict]:
    infos = await asyncio.gather(*(h.info.remote() for h in encoders.values()))
    dims = {m: info["dim"] for m, info in zip(encoders, infos)} | dict(precomputed)
    versions = {m: info["version"] for m, info in zip(encoders, infos)}
    return dims, versions


@serve.deployment
class FusionDeployment:
    """Item tower, user tower and score attribution; models hot-swap through `user_config`.

    The model configured last is the newest; the previous one stays loaded so that requests
    keep using the version the stored fused vectors were made with until `fusionrec reindex`
    moves the store over. Every method takes the model version to use (default: newest).
    """

    async def __init__(self, encoders: dict[str, DeploymentHandle], precomputed: dict[str, int]) -> None:
        self.dims, self.encoder_versions = await _modality_dims(encoders, precomputed)
        self.models: dict[str, Any] = {}
        self.newest = ""

    def reconfigure(self, user_config: dict) -> None:
        cfg = FusionConfig.model_validate(user_config)
        model = get_fusion_model(cfg.name, self.dims, encoder_versions=self.encoder_versions, **cfg.options)
        if model.version != self.newest:
            self.models = {v: m for v, m in self.models.items() if v == self.newest} | {model.version: model}
            self.newest = model.version
            log.info("fusion model %s loaded (kept: %s)", model.version, sorted(self.models))
            settle_heap()

    def _model(self, version: str | None):
        try:
            return self.models[version or self.newest]
        except KeyError:
            raise FailedPrecondition(f"fusion model {version!r} is not loaded (loaded: {sorted(self.models)}); "
                                     "run `fusionrec reindex` after changing the fusion model") from None

    def model(self, version: str | None = None):
        """A copy of the model (plain Python object) for replicas that score next to the data."""
        return self._model(version)

    def info(self, version: str | None = None) -> dict[str, Any]:
        model = self._model(version)
        return {"version": model.version, "dim": model.dim, "modality_dims": model.modality_dims,
                "loaded": sorted(self.models)}

    def item_vectors(self, items: list[dict[str, np.ndarray]], item_ids: list[str] | None = None,
                     version: str | None = None) -> np.ndarray:
        return self._model(version).item_vectors(items, item_ids)

    def user_vector(self, history: np.ndarray, query: dict[str, np.ndarray], version: str | None = None) -> np.ndarray:
        return self._model(version).user_vector(history, query)

    def contributions(self, user: np.ndarray, items: np.ndarray, version: str | None = None) -> dict[str, np.ndarray]:
        return self._model(version).contributions(user, items)


@serve.deployment
class RetrievalDeployment:
    """The only owner of the Milvus data: items, vectors, attributes and interaction history."""

    async def __init__(self, config: dict, encoders: dict[str, DeploymentHandle], fusion: DeploymentHandle,
                       precomputed: dict[str, int]) -> None:
        self.fusion = fusion
        from fusionrec.retrieval.milvus import MilvusStore  # pymilvus loads only in this replica

        cfg = StoreConfig.model_validate(config)
        dims, versions = await _modality_dims(encoders, precomputed)
        fusion_info = await fusion.info.remote()
        self.schema = StoreSchema(modality_dims=dims, fused_dim=fusion_info["dim"],
                                  encoder_versions=versions, model_version=fusion_info["version"])
        self.store = await asyncio.to_thread(
            MilvusStore, cfg.uri, self.schema, items_collection=cfg.items_collection,
            interactions_collection=cfg.interactions_collection, token=cfg.token,
            search_backend=cfg.search_backend, index_params=cfg.index_params, accept_stored_model=True,
            flush_every_rows=cfg.flush_every_rows)
        self.schema = self.store.schema
        self._lock = threading.RLock()  # one client call at a time: Milvus Lite is single-threaded
        self._models: dict[str, Any] = {}
        self._unsettled = 0  # items written since the last settle_heap()
        if self.schema.model_version != fusion_info["version"]:
            # Stored fused vectors come from another fusion model: rebuild them from the stored
            # modality vectors before serving (no re-encoding).
            log.warning("store indexed with %s, fusion model is %s: re-indexing", self.schema.model_version,
                        fusion_info["version"])
            await self.reindex(fusion_info["version"])  # settles the heap itself
        else:
            settle_heap()

    def info(self) -> dict[str, Any]:
        return asdict(self.schema)

    def check_health(self) -> None:
        with self._lock:
            self.store.count()

    def count(self) -> int:
        with self._lock:
            return self.store.count()

    def upsert(self, items: list[StoredItem]) -> int:
        with self._lock:
            self.store.upsert(items)
            self._unsettled += len(items)
            if self._unsettled >= SETTLE_EVERY_ITEMS:  # bulk loads: freeze what they built, amortised
                settle_heap()
                self._unsettled = 0
        return len(items)

    def delete(self, item_ids: list[str]) -> list[str]:
        with self._lock:
            return self.store.delete(item_ids)

    def get(self, item_ids: list[str]) -> dict[str, StoredItem]:
        with self._lock:
            return self.store.get(item_ids)

    def fused_vectors(self, item_ids: list[str]) -> tuple[list[str], np.ndarray]:
        """Known ids among item_ids (order kept) and their (n, fused_dim) vectors."""
        with self._lock:
            found = self.store.fused(item_ids)
        ids = [i for i in item_ids if i in found]
        vecs = np.stack([found[i] for i in ids]) if ids else np.zeros((0, self.schema.fused_dim), np.float32)
        return ids, vecs

    def history_vectors(self, user_id: str, limit: int) -> tuple[list[str], np.ndarray]:
        """The user's recent item ids (oldest first) and their fused vectors."""
        with self._lock:
            events = self.store.history(user_id, limit)
        return self.fused_vectors([e.item_id for e in events])

    async def recommend(self, q: RecommendQuery, query: dict[str, np.ndarray], model_version: str,
                        history_limit: int) -> Ranked | None:
        """History -> user vector -> search -> attribution, next to the data: one hop per request.

        The fusion model is a copy pulled from the Fusion deployment (which owns loading and
        hot-swapping). Returns None when `model_version` is not the one the stored vectors were
        made with (the store was re-indexed meanwhile); the caller refreshes and retries.
        """
        if model_version != self.schema.model_version:
            return None
        model = await self._scoring_model(model_version)
        with self._lock:
            if q.history_item_ids:
                history_ids, history = self.fused_vectors(q.history_item_ids)
            elif q.user_id:
                history_ids, history = self.history_vectors(q.user_id, history_limit)
            else:
                history_ids, history = [], np.zeros((0, model.dim), np.float32)
            if not len(history) and not query:
                raise NotFound(f"user {q.user_id!r} has no recorded interactions and the request carries "
                               "no usable history or query content; send history_item_ids or query content")
            try:
                user = model.user_vector(history, query)
            except ValueError as err:  # e.g. a query only in modalities this model was not trained on
                raise InvalidArgument(f"fusion model {model_version} cannot use this request: {err}") from None
            exclude = set(q.exclude_item_ids) | (set() if q.include_seen else set(history_ids))
            candidates = self.store.search(user, q.k, q.filters, exclude)
        if not candidates:
            return Ranked([], [], {}, bool(len(history)))
        fused = np.stack([c.fused for c in candidates])
        return Ranked(candidates, (fused @ user).tolist(), model.contributions(user, fused), bool(len(history)))

    async def _scoring_model(self, version: str):
        if version not in self._models:
            self._models = {version: await self.fusion.model.remote(version)}  # keep only the live one
        return self._models[version]

    async def reindex(self, version: str | None = None, batch_size: int = 1000) -> dict[str, Any]:
        """Recompute every fused vector with fusion model `version` (default: the newest loaded)
        from the stored modality vectors, then switch the store to it atomically."""
        info = await self.fusion.info.remote(version)
        if info["version"] == self.schema.model_version:
            return {"model_version": info["version"], "items": 0, "changed": False}
        model = await self.fusion.model.remote(info["version"])

        def fused_for(batch: list[StoredItem]) -> np.ndarray:
            return model.item_vectors([b.modality_vectors for b in batch], [b.item_id for b in batch])

        new_schema = replace(self.schema, fused_dim=info["dim"], model_version=info["version"])
        # In a worker thread and without self._lock: searches keep reading the old vectors until
        # the store switches; writes wait on the store's own write lock.
        n = await asyncio.to_thread(self.store.reindex, new_schema, fused_for, batch_size)
        self.schema = new_schema
        settle_heap()
        return {"model_version": info["version"], "items": n, "changed": True}

    def record_interactions(self, events: list[InteractionEvent]) -> int:
        with self._lock:
            known = self.store.fused(sorted({e.item_id for e in events}))
            missing = sorted({e.item_id for e in events} - set(known))
            if missing:
                raise NotFound(f"interactions name unknown items {missing[:10]}; upsert them first "
                               "(nothing from this batch was recorded)")
            self.store.record_interactions(events)
        return len(events)

    def __del__(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()


def encoder_deployment_name(modality: str) -> str:
    return f"{modality.capitalize()}Encoder"


__all__ = ["EncoderDeployment", "FusionDeployment", "RetrievalDeployment", "encoder_deployment_name", "AppConfig"]
