"""Serving cost of the ranking stage at 100k items: Recommend with and without it, at two levels.

Engine level (no gRPC, no Ray): a real Milvus Lite store with the in-memory index, the real weighted-v0
item and user towers over clustered synthetic modality vectors (bench/retrieval.py's source), users with
20-event histories, and the served kind of ranker (an AveragedRanker of 3 LightGBM lambdarank members, as
`fusionrec eval-ranking` saves) trained on the bench's own candidate lists (its held-out events as labels),
each member at the size the evaluation chooses at most (400 rounds of 7 leaves). Each
request runs both ways, alternating which goes first, so drift on a shared machine hits both alike.

Service level (bench/ranking_service.py): Recommend over real gRPC against the real app on a fresh store
of the same size, ranking off and on (the same ranker file) in alternating phases of one run.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from threadpoolctl import threadpool_limits

from fusionrec.bench.ranking_service import latency_stats, ratios, run_service
from fusionrec.bench.retrieval import VectorSource
from fusionrec.core.paths import results_dir
from fusionrec.fusion.registry import get_fusion_model
from fusionrec.ranking.ranker import AveragedRanker, LightGBMRanker
from fusionrec.ranking.stage import RankingStage
from fusionrec.retrieval.base import InteractionEvent, StoredItem, StoreSchema
from fusionrec.retrieval.engine import RetrievalEngine
from fusionrec.retrieval.query import QueryContent, RecommendQuery

DIMS = {"text": 384, "image": 1280, "audio": 128}
HISTORY, HELD_OUT = 20, 5
RANKER_PARAMS = {"num_leaves": 7, "num_boost_round": 400, "base_scale": 6.7}
RANKER_MEMBERS = 3  # as served (ranking/ranker.py AveragedRanker): 3 x the trees of one ranker


def _catalog(engine: RetrievalEngine, model: Any, n_items: int, rng: np.random.Generator,
             progress: Callable[[str], None], batch: int = 5000) -> None:
    """Upsert ``n_items`` items with clustered modality vectors through the item tower."""
    sources = {m: VectorSource(d, seed=i) for i, (m, d) in enumerate(DIMS.items())}
    for start in range(0, n_items, batch):
        ids = [f"item-{i:06d}" for i in range(start, min(start + batch, n_items))]
        vecs = {m: s.sample(len(ids), rng) for m, s in sources.items()}
        rows = [{m: vecs[m][r] for m in DIMS} for r in range(len(ids))]
        fused = model.item_vectors(rows, ids)
        engine.upsert([StoredItem(i, {"shard": f"s{r % 20:02d}"}, rows[r], fused[r],
                                  dict(engine.schema.encoder_versions), model.version) for r, i in enumerate(ids)])
        progress(f"upserted {start + len(ids)} / {n_items} items")


def _users(engine: RetrievalEngine, n_items: int, n_users: int, rng: np.random.Generator) -> dict[str, list[str]]:
    """Record each user's history; returns user -> held-out items (the ranker's labels)."""
    held: dict[str, list[str]] = {}
    events = []
    for u in range(n_users):
        picks = [f"item-{i:06d}" for i in rng.choice(n_items, HISTORY + HELD_OUT, replace=False)]
        events += [InteractionEvent(f"user-{u:05d}", i, "click", float(t)) for t, i in enumerate(picks[:HISTORY])]
        held[f"user-{u:05d}"] = picks[HISTORY:]
    engine.record_interactions(events)
    return held


def _train_ranker(engine: RetrievalEngine, model: Any, held: dict[str, list[str]], candidates_n: int) -> AveragedRanker:
    """A ranker fitted on the engine's own candidate lists (features as served, held-out items as labels)."""
    from fusionrec.ranking.features import CandidateList, candidate_features

    xs, ys = [], []
    counts = dict(engine.store.popularity())
    for user, labels in list(held.items())[:300]:
        _, history = engine.history_vectors(user, 200)
        vec = model.user_vector(history, {})
        cands = engine.store.search(vec, candidates_n, None, set())
        fused = np.stack([c.fused for c in cands])
        pop = np.asarray([counts.get(c.item_id, 0) for c in cands], np.float32)
        cols = candidate_features(CandidateList(vec, history, fused, fused @ vec, popularity=pop), model.contributions)
        names = sorted(k for k in cols if not np.isnan(cols[k]).all())  # as fitted offline: known features only
        xs.append(np.stack([cols[k] for k in names], 1))
        ys.append(np.isin([c.item_id for c in cands], labels).astype(np.float32))
    members = [LightGBMRanker(names, RANKER_PARAMS) for _ in range(RANKER_MEMBERS)]
    return AveragedRanker(names, {}, members).fit(np.concatenate(xs), np.concatenate(ys),
                                                  np.asarray([len(y) for y in ys]))


def _measure(engine: RetrievalEngine, model: Any, stage: RankingStage, users: list[str], k: int
             ) -> dict[str, list[float]]:
    """Per request, Recommend with and without the stage (alternating which runs first), in ms."""
    out: dict[str, list[float]] = {"retrieval": [], "ranking": []}
    for r, user in enumerate(users):
        q = RecommendQuery(user_id=user, history_item_ids=[], query=QueryContent(), k=k, filters=[],
                           exclude_item_ids=[])
        for mode in (("retrieval", "ranking") if r % 2 else ("ranking", "retrieval")):
            engine.ranking = stage if mode == "ranking" else None
            t0 = time.perf_counter()
            engine.recommend(q, {}, model, 200)
            out[mode].append((time.perf_counter() - t0) * 1e3)
    engine.ranking = None
    return out


def _engine_level(n_items: int, n_users: int, requests: int, k: int, candidates_n: int, seed: int,
                  ranker_path: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Build the store, train the ranker (saved to ``ranker_path``), measure both paths through the engine."""
    rng = np.random.default_rng(seed)
    model = get_fusion_model("weighted-v0", DIMS)
    schema = StoreSchema(modality_dims=dict(DIMS), fused_dim=model.dim,
                         encoder_versions={m: f"{m}@bench" for m in DIMS}, model_version=model.version)
    with tempfile.TemporaryDirectory(prefix="fusionrec-bench-ranking-") as tmp:
        engine = RetrievalEngine.open(str(Path(tmp) / "store.db"), schema, search_backend="memory")
        try:
            t0 = time.perf_counter()
            _catalog(engine, model, n_items, rng, progress)
            held = _users(engine, n_items, n_users, rng)
            build_s = time.perf_counter() - t0
            ranker = _train_ranker(engine, model, held, candidates_n)
            ranker.save(ranker_path)
            stage = RankingStage(ranker, candidates_n)
            users = [str(u) for u in rng.choice(list(held), requests)]
            # One BLAS thread, as in a Serve replica (Ray sets OMP_NUM_THREADS=1 for fractional CPUs): two threads
            # on this 2-core machine made a (200 x 768) @ (768 x 20) product 60x slower whenever the other core was busy.
            with threadpool_limits(1):
                _measure(engine, model, stage, users[:20], k)  # warm-up (caches, first calls)
                times = _measure(engine, model, stage, users, k)
        finally:
            engine.close()
    stats = {mode: latency_stats(t) for mode, t in times.items()}
    return {"level": "engine (RetrievalEngine.recommend: history, user tower, in-memory search, ranking); no gRPC",
            "users": n_users, "requests": requests, "fused_dim": model.dim, "build_s": round(build_s, 1),
            "ranker": {"features": len(ranker.feature_names), "members": RANKER_MEMBERS, **RANKER_PARAMS},
            **stats, **ratios(stats)}


def run(n_items: int = 100_000, n_users: int = 2000, requests: int = 500, k: int = 10, candidates_n: int = 100,
        seed: int = 0, out: Path | None = None, progress: Callable[[str], None] = print, service: bool = True,
        service_requests: int = 500, service_users: int = 1000, service_pairs: int = 6,
        config: Path | None = None) -> dict[str, Any]:
    """The engine level, then (``service``) the service level with the same ranker; writes
    bench/results/ranking.json (``engine`` and ``service`` sections, each saying its level)."""
    with tempfile.TemporaryDirectory(prefix="fusionrec-bench-ranker-") as tmp:
        ranker_path = Path(tmp) / "ranker.json"
        engine = _engine_level(n_items, n_users, requests, k, candidates_n, seed, ranker_path, progress)
        progress(f"engine: retrieval p99 {engine['retrieval']['p99_ms']:.2f} ms, "
                 f"ranking p99 {engine['ranking']['p99_ms']:.2f} ms")
        result: dict[str, Any] = {"items": n_items, "k": k, "candidates_n": candidates_n, "engine": engine}
        path = Path(out or results_dir() / "ranking.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, sort_keys=True))  # kept should the service level fail
        if service:
            result["service"] = run_service(ranker_path, n_items, service_users, service_requests, candidates_n,
                                            pairs=service_pairs, config=config, log=progress)
            path.write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
