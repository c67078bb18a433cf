"""Retrieval benchmark: search latency and recall@100 of the in-memory index, Milvus Lite and a Milvus server.

``run()`` builds catalogs of realistic vectors (clustered, low-rank plus noise,
unit-normalised) at each size, measures batch-1 latency (p50/p99), latency and QPS from
concurrent threads, and recall@100 against exact search, with and without a ~5 %
selectivity filter, for both search backends of MilvusStore, plus insert/build time and
memory. Milvus Lite 3.2.2 is measured only up to ``milvus_max_size`` (its inserts run at
~2-5k rows/s, so 1M rows would take most of an hour); the 1M in-memory index is built
directly (no Milvus) in chunks within its own stage's budget, and stops early when the
next chunk would overrun it. The exact truth is kept as a running top-k, so a 1M catalog
exists once (in the index). A real Milvus server (bench/retrieval_server.py) is measured
at ``server_sizes`` too: its inserts, its own HNSW build and its searches.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil

from fusionrec.core.paths import results_dir
from fusionrec.retrieval.ann import VectorIndex
from fusionrec.retrieval.base import FilterSpec, StoredItem, StoreSchema
from fusionrec.retrieval.mirror import ItemMirror

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_DIM = 768  # the served fused dim: 3 blocks of 256
K = 100
N_GENRES = 20  # one genre = ~5 % of the catalog
FILTER = [FilterSpec("genre", equals="g07")]
LATENT_DIM = 64
N_CLUSTERS = 1000
NOISE = 0.3  # isotropic noise norm relative to the low-rank part

Progress = Callable[[str], None]


class VectorSource:
    """Clustered low-rank vectors plus isotropic noise, unit-normalised; one fixed distribution."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centers = rng.standard_normal((N_CLUSTERS, LATENT_DIM)).astype(np.float32)
        self.basis = (rng.standard_normal((LATENT_DIM, dim)) / np.sqrt(LATENT_DIM)).astype(np.float32)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        z = self.centers[rng.integers(0, N_CLUSTERS, n)]
        z = z + 0.5 * rng.standard_normal((n, LATENT_DIM)).astype(np.float32)
        x = z @ self.basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += (NOISE / np.sqrt(self.dim)) * rng.standard_normal((n, self.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def _genres(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, N_GENRES, n)


class _TopK:
    """Running exact top-k (inner product) of fixed queries over rows that arrive in chunks: the truth
    for recall without keeping a second copy of a 1M-row catalog."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.rows = np.zeros((len(queries), 0), dtype=np.int64)

    def add(self, x: np.ndarray, offset: int, mask: np.ndarray | None = None) -> "_TopK":
        s = self.queries @ x.T
        if mask is not None:
            s[:, ~mask] = -np.inf
        scores = np.concatenate([self.scores, s], axis=1)
        rows = np.concatenate([self.rows, np.broadcast_to(offset + np.arange(len(x)), s.shape)], axis=1)
        keep = np.argpartition(-scores, min(self.k, scores.shape[1]) - 1, axis=1)[:, : self.k]
        self.scores = np.take_along_axis(scores, keep, axis=1)
        self.rows = np.take_along_axis(rows, keep, axis=1)
        return self

    def sets(self) -> list[set[int]]:
        return [set(r[np.isfinite(s)].tolist()) for r, s in zip(self.rows, self.scores)]


def _truths(queries: np.ndarray) -> dict[bool, _TopK]:
    """filtered -> running truth (filtered: genre g07 only)."""
    return {False: _TopK(queries, K), True: _TopK(queries, K)}


def _chunks(size: int, source: "VectorSource", rng: np.random.Generator, truth: dict[bool, _TopK],
            chunk: int = 100_000):
    """(offset, vectors, genres) chunks of a size-row catalog, each added to ``truth`` on the way."""
    for offset in range(0, size, chunk):
        n = min(chunk, size - offset)
        x, g = source.sample(n, rng), _genres(n, rng)
        truth[False].add(x, offset)
        truth[True].add(x, offset, g == 7)
        yield offset, x, g


def _latencies(search: Callable[[np.ndarray], list[int]], queries: np.ndarray) -> tuple[list[float], list[list[int]]]:
    lat, res = [], []
    for q in queries:
        t = time.perf_counter()
        r = search(q)
        lat.append((time.perf_counter() - t) * 1e3)
        res.append(r)
    return lat, res


def _concurrent(search: Callable[[np.ndarray], Any], queries: np.ndarray, threads: int) -> dict[str, float]:
    lat: list[float] = []
    lock = threading.Lock()

    def one(q):
        t = time.perf_counter()
        search(q)
        dt = (time.perf_counter() - t) * 1e3
        with lock:
            lat.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, queries))
    wall = time.perf_counter() - t0
    return {"conc_p50_ms": float(np.percentile(lat, 50)), "conc_p99_ms": float(np.percentile(lat, 99)),
            "conc_qps": len(queries) / wall}


def _measure(name: str, size: int, search_ids: Callable, queries: np.ndarray, truth: list[set[int]],
             id_to_row: Callable[[list], list[int]], threads: int, filtered: bool) -> dict[str, Any]:
    search_ids(queries[0])  # warm-up
    lat, res = _latencies(search_ids, queries)
    rec = float(np.mean([len(set(id_to_row(r)) & t) / max(1, min(K, len(t))) for r, t in zip(res, truth)]))
    row = {"backend": name, "size": size, "filtered": filtered, "queries": len(queries),
           "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
           "recall_at_100": rec}
    row.update(_concurrent(search_ids, queries, threads))
    return row


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _milvus_size(size, dim, x, genres, queries, threads, n_milvus_q, workdir, say) -> tuple[list[dict], dict]:
    """Insert into Milvus Lite through MilvusStore, then search through both backends."""
    from fusionrec.retrieval.milvus import MilvusStore

    schema = StoreSchema(modality_dims={}, fused_dim=dim, encoder_versions={}, model_version="bench")
    path = os.path.join(workdir, f"retrieval_{size}.db")
    ids = [f"it{i}" for i in range(size)]
    store = MilvusStore(path, schema, search_backend="milvus", flush_every_rows=0)
    t = time.perf_counter()
    for s in range(0, size, 2000):
        store.upsert([StoredItem(ids[i], {"genre": f"g{genres[i]:02d}"}, {}, x[i], {}, "bench")
                      for i in range(s, min(size, s + 2000))])
    store.flush()
    insert_s = time.perf_counter() - t
    say(f"  milvus insert {size} rows: {insert_s:.1f}s ({size / insert_s:.0f} rows/s)")
    rss0 = _rss_mb()
    t = time.perf_counter()
    mem = MilvusStore(path, schema, search_backend="memory", interactions_collection="interactions_mem")
    open_s = time.perf_counter() - t
    say(f"  memory backend open (read {size} rows from Milvus + HNSW build): {open_s:.1f}s")
    info = {"size": size, "milvus_insert_s": insert_s, "milvus_rows_per_s": size / insert_s,
            "memory_open_s": open_s, "memory_mb": mem.memory_bytes() / 2**20,
            "rss_delta_mb": _rss_mb() - rss0}
    row_of = {i: n for n, i in enumerate(ids)}
    to_rows = lambda r: [row_of[i] for i in r]  # noqa: E731
    truths = {False: _TopK(queries, K).add(x, 0).sets(), True: _TopK(queries, K).add(x, 0, genres == 7).sets()}
    rows = []
    for filtered in (False, True):
        f = FILTER if filtered else None
        truth = truths[filtered]
        for name, st, nq in (("memory", mem, len(queries)), ("milvus", store, n_milvus_q)):
            search = lambda q, st=st, f=f: [c.item_id for c in st.search(q, K, filters=f)]  # noqa: E731
            rows.append(_measure(name, size, search, queries[:nq], truth[:nq], to_rows, threads, filtered))
            say("  " + _fmt(rows[-1]))
    mem.close()
    store.close()
    return rows, info


def _memory_only_size(size, dim, source, rng, queries, threads, budget_s, say) -> tuple[list[dict], dict]:
    """Build the in-memory mirror directly in chunks (no Milvus); stops early when the next chunk would
    take the time spent in the index past ``budget_s`` (drawing vectors and the exact truth do not
    count: they are the benchmark's, not the index's). Only the mirror holds the vectors."""
    mirror = ItemMirror(dim)
    truth = _truths(queries)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    built, build_s = 0, 0.0
    for offset, x, g in _chunks(size, source, rng, truth):
        t = time.perf_counter()
        mirror.upsert([f"it{offset + i}" for i in range(len(x))], x, [{"genre": f"g{v:02d}"} for v in g])
        per_chunk = time.perf_counter() - t
        build_s += per_chunk
        built = offset + len(x)
        del x
        say(f"  built {built}/{size}: {build_s:.0f}s in the index ({time.perf_counter() - t0:.0f}s with sampling)")
        if built < size and build_s + 1.15 * per_chunk * (1 + built / size) > budget_s:
            say(f"  stopping at {built} rows: the next chunk would overrun the time budget")
            break
    info = {"size": size, "built": built, "memory_build_s": build_s, "memory_mb": mirror.memory_bytes() / 2**20,
            "rss_delta_mb": _rss_mb() - rss0, "index_params": VectorIndex(dim).params}
    rows = []
    for filtered in (False, True):
        f = FILTER if filtered else None
        search = lambda q, f=f: [c.item_id for c in mirror.search(q, K, f)]  # noqa: E731
        row = _measure("memory", built, search, queries, truth[filtered].sets(), lambda r: [int(i[2:]) for i in r],
                       threads, filtered)
        row["requested_size"] = size
        rows.append(row)
        say("  " + _fmt(rows[-1]))
    return rows, info


def _fmt(r: dict) -> str:
    return (f"{r['backend']:<7} {r['size']:>9,} {'5%' if r['filtered'] else 'none':<5} "
            f"p50 {r['p50_ms']:8.2f}  p99 {r['p99_ms']:8.2f}  conc p99 {r['conc_p99_ms']:8.2f}  "
            f"qps {r['conc_qps']:8.1f}  recall@100 {r['recall_at_100']:.4f}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for backend in ("memory", "milvus", "milvus-server"):
        for filtered, style in ((False, "-o"), (True, "--s")):
            pts = sorted((r["size"], r["p99_ms"], r["recall_at_100"]) for r in rows
                         if r["backend"] == backend and r["filtered"] == filtered)
            if not pts:
                continue
            xs, ys, recs = zip(*pts)
            ax.plot(xs, ys, style, label=f"{backend} {'5% filter' if filtered else 'no filter'} (p99)")
            for x_, y_, r_ in pts:
                ax.annotate(f"R={r_:.3f}", (x_, y_), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(10, color="grey", lw=0.8, ls=":", label="target p99 10 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items")
    ax.set_ylabel("search latency p99, batch 1 (ms)")
    ax.set_title("fusionrec retrieval: top-100, R = recall@100 vs exact")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _notes(dim: int, milvus_max_size: int, n_milvus_queries: int) -> list[str]:
    return [f"vectors: {dim}-d, {N_CLUSTERS} clusters in a {LATENT_DIM}-d latent space, isotropic noise "
            f"{NOISE} of the norm, unit-normalised; filter genre == g07 (1/{N_GENRES} of items)",
            f"Milvus Lite measured up to {milvus_max_size:,} rows (insert ~2-5k rows/s; 1M would take "
            f"most of an hour), {n_milvus_queries} queries each (every Lite search costs tens to hundreds of ms)"]


def _measure_sizes(sizes: tuple[int, ...], dim: int, source: VectorSource, rng: np.random.Generator,
                   queries: np.ndarray, threads: int, n_milvus_queries: int, milvus_max_size: int,
                   budget_s: float, notes: list[str], say: Progress) -> tuple[list[dict], list[dict]]:
    """Every size in turn: Milvus Lite + both backends up to milvus_max_size, the in-memory index alone above
    (its index build within ``budget_s``).

    Returns (rows, build); a size cut short by the time budget adds a line to ``notes``.
    """
    rows: list[dict] = []
    build: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fusionrec-bench-") as workdir:
        for size in sizes:
            say(f"size {size:,}")
            if size <= milvus_max_size:
                x = source.sample(size, rng)
                g = _genres(size, rng)
                r, info = _milvus_size(size, dim, x, g, queries, threads, n_milvus_queries, workdir, say)
                del x
            else:
                r, info = _memory_only_size(size, dim, source, rng, queries, threads, budget_s, say)
                if info["built"] < size:
                    notes.append(f"{size:,}: only {info['built']:,} rows fitted in the {budget_s:.0f}s index budget")
            rows.extend(r)
            info["memory_mb_per_100k"] = info["memory_mb"] * 100_000 / max(1, info.get("built", size))
            build.append(info)
            gc.collect()
    return rows, build


def _server_sizes(sizes: tuple[int, ...], dim: int, seed: int, threads: int, n_queries: int, budget_s: float,
                  notes: list[str], say: Progress) -> tuple[list[dict], list[dict]]:
    """The Milvus server's own figures (bench/retrieval_server.py), one fresh server per size, the same
    vector distribution and queries as the in-memory rows (at ``dim``)."""
    from fusionrec.bench.retrieval_server import server_size

    source = VectorSource(dim, seed)
    queries = source.sample(n_queries, np.random.default_rng(seed + 2))
    rows: list[dict] = []
    build: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fusionrec-bench-server-") as workdir:
        for size in sizes:
            say(f"milvus server, size {size:,}, dim {dim}")
            r, info = server_size(size, dim, source, np.random.default_rng(seed + 1), queries, threads, workdir,
                                  budget_s, say)
            if "skipped" in info:
                notes.append(f"Milvus server stage skipped: {info['skipped']}")
                return rows, build
            if info["built"] < size:
                notes.append(f"Milvus server {size:,}: only {info['built']:,} rows inserted in the "
                             f"{budget_s:.0f}s budget")
            rows.extend(r)
            build.append(info | {"dim": dim})
            gc.collect()
    return rows, build


def _summary(rows: list[dict]) -> dict[str, float]:
    """The headline figures: the 100k-item rows, memory backend (and Milvus p99 when measured)."""
    ref = {(r["backend"], r["filtered"]): r for r in rows if r["size"] == 100_000}
    if ("memory", False) not in ref:
        return {}
    summary = {
        "retrieval_recall_at_100": ref[("memory", False)]["recall_at_100"],
        "retrieval_p99_ms": ref[("memory", False)]["p99_ms"],
        "retrieval_filtered_recall_at_100": ref[("memory", True)]["recall_at_100"],
        "retrieval_filtered_p99_ms": ref[("memory", True)]["p99_ms"],
    }
    if ("milvus", False) in ref:
        summary["retrieval_milvus_p99_ms"] = ref[("milvus", False)]["p99_ms"]
    if ("milvus-server", False) in ref:
        summary["retrieval_server_p99_ms"] = ref[("milvus-server", False)]["p99_ms"]
        summary["retrieval_server_recall_at_100"] = ref[("milvus-server", False)]["recall_at_100"]
    big = {(r["backend"], r["filtered"]): r for r in rows if r.get("requested_size", r["size"]) == 1_000_000}
    for (backend, filtered), r in big.items():  # the 1M rows: in-memory index and the Milvus server
        name = f"retrieval_1m_{backend.replace('-', '_')}{'_filtered' if filtered else ''}"
        summary |= {f"{name}_recall_at_100": r["recall_at_100"], f"{name}_p99_ms": r["p99_ms"],
                    f"{name}_rows": r["size"]}
    return summary


def _report(rows: list[dict], build: list[dict], notes: list[str], say: Progress) -> None:
    say("\nbackend      items filt  batch-1 latency (ms)  | 8 threads")
    for r in rows:
        say(_fmt(r))
    for b in build:
        say("build: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in b.items()))
    for n in notes:
        say("note: " + n)


def run(
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    dim: int = DEFAULT_DIM,
    out_dir: Path | None = None,  # None: fusionrec.core.paths.results_dir()
    progress: Progress | None = None,  # None: print to stdout
    *,
    n_queries: int = 200,
    n_milvus_queries: int = 40,
    threads: int = 8,
    milvus_max_size: int = 100_000,
    budget_s: float = 480.0,
    server_sizes: tuple[int, ...] = (100_000, 1_000_000),
    server_dim: int | None = None,
    n_server_queries: int = 100,
    server_budget_s: float = 900.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure both search backends at each size; writes retrieval.json and retrieval.png.

    Returns {"rows": [...], "build": [...], "summary": {...}, "notes": [...]}; each row has
    backend, size, filtered, p50_ms, p99_ms (batch 1), conc_p50_ms/conc_p99_ms/conc_qps
    (``threads`` concurrent callers) and recall_at_100 (vs exact inner-product search).
    """
    say = progress or (lambda s: print(s, flush=True))
    out_dir = results_dir() if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = VectorSource(dim, seed)
    rng = np.random.default_rng(seed + 1)
    queries = source.sample(n_queries, np.random.default_rng(seed + 2))
    notes = _notes(dim, milvus_max_size, n_milvus_queries)
    rows, build = _measure_sizes(sizes, dim, source, rng, queries, threads, n_milvus_queries, milvus_max_size,
                                 budget_s, notes, say)
    server_dim = server_dim or dim
    if server_sizes:
        r, b = _server_sizes(server_sizes, server_dim, seed, threads, n_server_queries, server_budget_s, notes, say)
        rows += r
        build += b
    result = {"date": time.strftime("%Y-%m-%d"), "dim": dim, "server_dim": server_dim, "k": K, "threads": threads,
              "rows": rows, "build": build, "summary": _summary(rows), "notes": notes}
    (out_dir / "retrieval.json").write_text(json.dumps(result, indent=2))
    _plot(rows, out_dir / "retrieval.png")
    _report(rows, build, notes, say)
    return result


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The summary.json figures of a ``run`` result (100k items, memory backend, single query)."""
    return dict(result.get("summary", {}))


if __name__ == "__main__":
    import sys

    sizes = tuple(int(s) for s in sys.argv[1:]) or DEFAULT_SIZES
    t = time.perf_counter()
    run(sizes, progress=lambda s: print(s, flush=True))
    print(f"total {time.perf_counter() - t:.0f}s")
