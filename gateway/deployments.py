"""Ray Serve deployments: thin wrappers (batching, placement, readiness) around plain classes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import threading
from dataclasses import asdict
from typing import Any, Callable

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from fusionrec.encoders.base import InvalidContent
from fusionrec.encoders.registry import get_encoder
from fusionrec.fusion.registry import get_fusion_model
from fusionrec.gateway.config import EncoderConfig, EncoderUserConfig, FusionConfig, RankingConfig, RetrievalUserConfig, \
    StoreConfig, secret
from fusionrec.gateway.metrics_cluster import EncoderLoad, StoreProgress
from fusionrec.core.errors import FailedPrecondition
from fusionrec.retrieval.base import InteractionEvent, StoredItem, StoreSchema
from fusionrec.retrieval.content import open_content_store
from fusionrec.retrieval.engine import RetrievalEngine
from fusionrec.retrieval.query import Ranked, RecommendQuery
from fusionrec.retrieval.server_items import ServerOptions
from fusionrec.retrieval.swap import COMMIT_BATCH_ITEMS, niced, preemptible

log = logging.getLogger("ray.serve")  # lands in the replica log files


SETTLE_EVERY_ITEMS = 20_000
#: An encoder replica loads its model (imports, weights, warm-up) in a thread at this niceness: a replica
#: that autoscaling adds under load otherwise takes a core from those serving for its ~3-7 s of start-up
#: (on 2 cores, a 2x overload's admitted p99 doubled for those seconds: `fusionrec bench reliability`).
#: Niceness is per thread on Linux, so the replica serves at its normal priority once loaded.
LOAD_NICENESS = 19


def settle_heap() -> None:
    """Collect, then freeze everything alive (models, the store's indexes) out of the cyclic GC.

    A full collection walks every tracked container: ~90 ms at 50k stored items in the Retrieval
    replica, landing on whichever requests are in flight (p99). Frozen objects are still freed
    by reference counting; only cycles among them would outlive the freeze.
    """
    gc.collect()
    gc.freeze()


def lower_priority(niceness: int) -> None:
    """Every thread of this process at ``niceness`` at least (Linux keeps it per thread; threads started
    later inherit it). Only ever lowers the priority: raising it back needs privileges."""
    if niceness <= 0:
        return
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in map(int, tasks):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)


@serve.deployment
class EncoderDeployment:
    """One modality encoder behind @serve.batch; a bad input fails only its own request."""

    def __init__(self, modality: str, config: dict, niceness: int = 0) -> None:
        # An incoming encoder of a swap lowers its priority before loading its model (user_config's niceness
        # comes only after __init__): its load, like its encoding, yields the shared cores to serving.
        lower_priority(niceness)
        self.modality = modality
        self.configured = EncoderConfig.model_validate(config)  # the app args' choice
        self.current = self.configured  # what runs now: user_config's `encoder` replaces it
        self.encoder = niced(lambda: self._load(self.current), LOAD_NICENESS, "load-encoder")
        self.load = EncoderLoad()  # batch sizes and queue depth, for the Gateway's /metrics

    def _load(self, cfg: EncoderConfig):
        encoder = get_encoder(cfg.name, **cfg.options)
        if encoder.modality != self.modality:
            raise ValueError(f"encoder {cfg.name!r} encodes {encoder.modality}, not {self.modality}")
        encoder.warmup()
        settle_heap()
        return encoder

    def reconfigure(self, user_config: dict) -> None:
        cfg = EncoderUserConfig.model_validate(user_config)  # typed: a misspelt key fails the deploy
        self.user_cfg = cfg
        self._encode_batch.set_max_batch_size(cfg.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        lower_priority(cfg.niceness)
        wanted = cfg.encoder or self.configured
        if wanted != self.current:  # batches in flight finish with the encoder they started with
            # At the lowest priority (a swap's last step, while serving): this replica's requests wait, others not.
            self.encoder = preemptible(lambda: self._load(wanted))
            self.current = wanted
            log.info("%s encoder is now %s", self.modality, self.encoder.version)

    def user_config(self) -> dict[str, Any]:
        """The user_config in effect, with the encoder running now (what a redeploy must keep)."""
        return self.user_cfg.model_copy(update={"encoder": self.current}).model_dump()

    def info(self) -> dict[str, Any]:
        e = self.encoder
        return {"name": e.name, "version": e.version, "modality": e.modality, "dim": e.dim}

    def stats(self) -> dict[str, Any]:
        """This replica's batch sizes and queue depth (gateway/metrics_cluster.py)."""
        return self.load.snapshot(serve.get_replica_context().replica_id.unique_id, self.modality)

    async def encode(self, content: str | bytes) -> np.ndarray:
        """One input -> (dim,) float32 unit vector; raises InvalidContent for bad input."""
        with self.load.waiting(1):
            result = await self._encode_batch(content)
        if isinstance(result, Exception):
            raise result
        return result

    async def encode_many(self, contents: list[str | bytes]) -> list[np.ndarray | InvalidContent]:
        """Several inputs in one call (one hop for a whole upsert); they join the same batches.

        Returns per input a (dim,) vector or the InvalidContent it raised.
        """
        with self.load.waiting(len(contents)):
            return list(await asyncio.gather(*(self._encode_batch(c) for c in contents)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, contents: list[str | bytes]) -> list[np.ndarray | InvalidContent]:
        self.load.batch(len(contents))
        # Off the event loop, so the next batch queues up while this one runs.
        return await asyncio.to_thread(self._encode_isolated, contents)

    def _encode_isolated(self, contents: list[str | bytes]) -> list[np.ndarray | InvalidContent]:
        encoder = self.encoder  # one encoder for the whole batch, even if reconfigure swaps it meanwhile
        out: list[Any] = [None] * len(contents)
        prepared, positions = [], []
        for i, content in enumerate(contents):
            try:
                prepared.append(encoder.prepare(content))
                positions.append(i)
            except InvalidContent as err:
                out[i] = err
        if prepared:
            for i, vec in zip(positions, encoder.embed(prepared)):
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

    def config(self) -> dict[str, Any]:
        """The user_config last applied (the newest model's)."""
        return self.cfg.model_dump()

    def reconfigure(self, user_config: dict) -> None:
        cfg = FusionConfig.model_validate(user_config)
        self.cfg = cfg
        versions = self.encoder_versions | cfg.encoder_versions  # a swap names the incoming encoder's
        model = get_fusion_model(cfg.name, self.dims, encoder_versions=versions, **cfg.options)
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


def _ranking_stage(cfg: RankingConfig) -> Any:
    """The configured ranking stage (fusionrec.ranking.stage), or None when no ranker is named."""
    if not cfg.ranker_path:
        return None
    from fusionrec.ranking.stage import RankingStage  # LightGBM loads only where a ranker is configured

    path = os.path.abspath(os.path.expanduser(cfg.ranker_path))
    return RankingStage.from_file(path, cfg.candidates_n, cfg.mmr_lambda)


@serve.deployment
class RetrievalDeployment:
    """Serves a RetrievalEngine (retrieval/engine.py): the one owner of a Milvus Lite file, or one of
    the replicas sharing a Milvus server (each follows the others' re-indexes and swaps).

    Learns dims and versions from the encoder and Fusion deployments, scores with a copy of the
    fusion model pulled from Fusion (which owns loading and hot-swapping), and keeps the heap
    settled for serving.
    """

    async def __init__(self, config: dict, encoders: dict[str, DeploymentHandle], fusion: DeploymentHandle,
                       precomputed: dict[str, int]) -> None:
        self.fusion = fusion
        cfg = StoreConfig.model_validate(config)
        dims, versions = await _modality_dims(encoders, precomputed)
        fusion_info = await fusion.info.remote()
        schema = StoreSchema(modality_dims=dims, fused_dim=fusion_info["dim"],
                             encoder_versions=versions, model_version=fusion_info["version"])
        self.engine = await asyncio.to_thread(
            RetrievalEngine.open, cfg.uri, schema, token=secret(cfg.token, cfg.token_env, "store.token_env"),
            items_collection=cfg.items_collection,
            interactions_collection=cfg.interactions_collection, search_backend=cfg.search_backend,
            index_params=cfg.index_params, flush_every_rows=cfg.flush_every_rows,
            content=open_content_store(cfg.content_uri) if cfg.retain_content else None,
            server=ServerOptions(consistency_level=cfg.consistency_level, state_ttl_s=cfg.state_ttl_s,
                                 popularity_ttl_s=cfg.popularity_ttl_s))
        self._models: dict[str, Any] = {}
        self.user_cfg = RetrievalUserConfig()  # reconfigure() applies the deployment's
        self.progress = StoreProgress()  # re-index and swap progress, for the Gateway's /metrics
        self._unsettled = 0  # items written since the last settle_heap()
        self._settle_lock = threading.Lock()
        if self.schema.model_version != fusion_info["version"]:
            # Stored fused vectors come from another fusion model: rebuild them from the stored
            # modality vectors before serving (no re-encoding).
            log.warning("store indexed with %s, fusion model is %s: re-indexing", self.schema.model_version,
                        fusion_info["version"])
            await self.reindex(fusion_info["version"])  # settles the heap itself
        else:
            settle_heap()

    def reconfigure(self, user_config: dict) -> None:
        """The ranking stage, swapped in place: requests in flight finish with the stage they started with."""
        cfg = RetrievalUserConfig.model_validate(user_config)  # typed: a misspelt key fails the deploy
        self.engine.ranking = _ranking_stage(cfg.ranking)
        self.user_cfg = cfg
        log.info("ranking stage: %s", cfg.ranking.model_dump() if cfg.ranking.ranker_path else "off")

    def user_config(self) -> dict[str, Any]:
        """The user_config in effect (what a redeploy, e.g. an encoder swap's, must keep)."""
        return self.user_cfg.model_dump()

    @property
    def schema(self) -> StoreSchema:
        return self.engine.schema

    def info(self) -> dict[str, Any]:
        self.engine.sync(force=True)  # on a server: another replica's re-index or swap shows at once (~1 ms)
        return asdict(self.schema)

    def check_health(self) -> None:
        self.engine.count()

    def count(self) -> int:
        return self.engine.count()

    async def stats(self) -> dict[str, Any]:
        """Items, index size, fused-vector model, re-index and swap progress (gateway/metrics_cluster.py)."""
        items, swaps = await asyncio.gather(asyncio.to_thread(self.engine.count), asyncio.to_thread(self.engine.swaps))
        for modality in set(swaps) - set(self.progress.swaps):  # begun before this replica started: count once
            self.progress.swap_status(await asyncio.to_thread(self.engine.swap_status, modality))
        return {"items": items, "index_bytes": self.engine.store.memory_bytes(),
                "model_version": self.schema.model_version, "progress": self.progress.snapshot(swaps)}

    def upsert(self, items: list[StoredItem], contents: list[dict[str, str | bytes]] | None = None,
               shadow: dict[str, dict[str, np.ndarray]] | None = None) -> int:
        """Store items; ``contents`` (per item, modality -> raw content) is kept when retention is on;
        ``shadow``: incoming-encoder vectors during an encoder swap (RetrievalEngine.upsert)."""
        n = self.engine.upsert(items, contents, shadow)
        with self._settle_lock:
            self._unsettled += n
            if self._unsettled >= SETTLE_EVERY_ITEMS:  # bulk loads: freeze what they built, amortised
                settle_heap()
                self._unsettled = 0
        return n

    def delete(self, item_ids: list[str]) -> list[str]:
        return self.engine.delete(item_ids)

    def read_content(self, item_id: str, modality: str) -> bytes:
        """The raw content kept for one item's modality (RetrievalEngine.read_content)."""
        return self.engine.read_content(item_id, modality)

    def get(self, item_ids: list[str]) -> dict[str, StoredItem]:
        return self.engine.get(item_ids)

    def fused_vectors(self, item_ids: list[str]) -> tuple[list[str], np.ndarray]:
        """Known ids among item_ids (order kept) and their (n, fused_dim) vectors."""
        return self.engine.fused_vectors(item_ids)

    def history_vectors(self, user_id: str, limit: int) -> tuple[list[str], np.ndarray]:
        """The user's recent item ids (oldest first) and their fused vectors."""
        return self.engine.history_vectors(user_id, limit)

    async def recommend(self, q: RecommendQuery, query: dict[str, np.ndarray], model_version: str,
                        history_limit: int, query_versions: dict[str, str] | None = None) -> Ranked | None:
        """History -> user vector -> search -> attribution, next to the data: one hop per request.

        The fusion model is a copy pulled from the Fusion deployment (which owns loading and
        hot-swapping). Returns None when `model_version` is not the one the stored vectors were
        made with (the store was re-indexed meanwhile), or when a query vector comes from another
        encoder version than the store's (a swap committed meanwhile); the caller refreshes and retries.
        """
        if model_version != self.schema.model_version:
            self.engine.sync(force=True)  # another replica may have switched the shared store
            if model_version != self.schema.model_version:
                return None
        model = await self._scoring_model(model_version)
        if self.engine.store.shared:  # server reads wait on the network: let other requests run meanwhile
            return await asyncio.to_thread(self.engine.recommend, q, query, model, history_limit, query_versions)
        return self.engine.recommend(q, query, model, history_limit, query_versions)

    async def _scoring_model(self, version: str):
        if version not in self._models:
            self._models = {version: await self.fusion.model.remote(version)}  # keep only the live one
        return self._models[version]

    async def reindex(self, version: str | None = None, batch_size: int = 1000) -> dict[str, Any]:
        """Recompute every fused vector with fusion model `version` (default: the newest loaded)
        from the stored modality vectors, then switch the store to it atomically."""
        info = await self.fusion.info.remote(version)
        await asyncio.to_thread(self.engine.sync, True)  # another replica may have re-indexed already
        if info["version"] == self.schema.model_version:
            return {"model_version": info["version"], "items": 0, "changed": False}
        model = await self.fusion.model.remote(info["version"])
        n = await self._rebuild("reindex", self.engine.reindex, model, batch_size)
        return {"model_version": info["version"], "items": n, "changed": True}

    async def _rebuild(self, kind: str, rebuild: Callable[[Any, int], int], model: Any, batch_size: int) -> int:
        """Every fused vector recomputed with ``model`` by ``rebuild`` (a re-index or a swap commit), in a worker
        thread: searches keep reading the old vectors until the store switches. Progress goes to /metrics."""
        counted = self.progress.reindexing(kind, await asyncio.to_thread(self.engine.count), model)
        try:
            n = await asyncio.to_thread(rebuild, counted, batch_size)
        finally:
            self.progress.reindex_finished()
        settle_heap()
        return n

    def record_interactions(self, events: list[InteractionEvent]) -> int:
        return self.engine.record_interactions(events)

    # Encoder swap (gateway/swap.py drives it; RetrievalEngine does the work).

    def swaps(self) -> dict[str, str]:
        return self.engine.swaps()

    async def begin_swap(self, modality: str, version: str, dim: int) -> dict[str, Any]:
        status = await asyncio.to_thread(self.engine.begin_swap, modality, version, dim)
        self.progress.swap_status(status)
        return status

    async def swap_status(self, modality: str) -> dict[str, Any]:
        status = await asyncio.to_thread(self.engine.swap_status, modality)
        self.progress.swap_status(status)
        return status

    async def swap_todo(self, modality: str) -> dict[str, str]:
        return await asyncio.to_thread(self.engine.swap_todo, modality)

    async def read_digests(self, digests: list[str]) -> dict[str, bytes]:
        return await asyncio.to_thread(self.engine.read_digests, digests)

    def put_shadow(self, modality: str, vectors: dict[str, np.ndarray]) -> int:
        n = self.engine.put_shadow(modality, vectors)
        self.progress.shadow_written(modality, n)
        return n

    async def commit_swap(self, modality: str, model_version: str, batch_size: int = COMMIT_BATCH_ITEMS,
                          busy_share: float = 1.0) -> dict[str, Any]:
        """Switch ``modality`` to its shadow vectors, fused with loaded fusion model ``model_version``
        (``busy_share``: RetrievalEngine.commit_swap)."""
        model = await self.fusion.model.remote(model_version)
        commit = functools.partial(self.engine.commit_swap, modality, busy_share=busy_share)
        n = await self._rebuild("swap_commit", commit, model, batch_size)
        return {"model_version": model.version, "items": n, "encoder_versions": dict(self.schema.encoder_versions)}

    async def training_snapshot(self, swapping: str | None = None) -> dict[str, Any]:
        """Items' modality vectors and every interaction (RetrievalEngine.training_snapshot), off the loop."""
        return await asyncio.to_thread(self.engine.training_snapshot, 1000, swapping)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


__all__ = ["EncoderDeployment", "FusionDeployment", "RetrievalDeployment", "settle_heap"]
