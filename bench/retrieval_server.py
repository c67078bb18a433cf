"""The retrieval benchmark's Milvus server stage: a real `milvus-server` (Milvus 2.3.5 standalone, the
`milvus` test extra) started on loopback for each size, items written through MilvusStore, searched by
the server (its HNSW, M 16 / efConstruction 200, retrieval/layout.py) with the same vectors, queries
and exact truth as the in-memory rows.

The server is started and stopped by ``tests/milvus_server_support.py`` of the checkout (free loopback
ports for every listener, the embedded etcd included; stopped by its pid): one launcher for the tests
and the benchmark. Without a checkout or without the package the stage is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fusionrec.retrieval.base import StoredItem, StoreSchema

INSERT_BATCH = 5_000
INDEX_POLL_S = 2.0


def server_launcher() -> tuple[Any, str]:
    """(MilvusServer class, "") from the checkout's test support, or (None, why not)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "milvus_server_support.py"
    if not path.exists():
        return None, f"no {path} (the server stage runs from a checkout)"
    spec = importlib.util.spec_from_file_location("fusionrec_bench_milvus_server_support", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.server_command()  # pytest's skip (a BaseException) when milvus-server is not installed
    except BaseException as exc:  # noqa: BLE001 - a skip, a missing pytest: report and go on
        return None, f"milvus-server unavailable: {exc}"
    return module.MilvusServer, ""


def wait_indexed(uri: str, deadline: float) -> dict[str, int]:
    """Wait until every HNSW index on the server covers all its rows (or the deadline); its counts."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        while True:
            seen = {"total_rows": 0, "indexed_rows": 0, "pending_index_rows": 0}
            for name in client.list_collections():
                for index in client.list_indexes(name):
                    d = client.describe_index(name, index) or {}
                    if d.get("index_type") == "HNSW":
                        for key in seen:
                            seen[key] += int(d.get(key, 0))
            if (seen["indexed_rows"] >= seen["total_rows"] and not seen["pending_index_rows"]) \
                    or time.perf_counter() > deadline:
                return seen
            time.sleep(INDEX_POLL_S)
    finally:
        client.close()


def _insert(store, size: int, chunks, deadline: float, say: Callable[[str], None]) -> tuple[int, float]:
    """Write the chunks' rows through the store until done or the next chunk would overrun the deadline."""
    inserted, insert_s = 0, 0.0
    for offset, x, g in chunks:
        t = time.perf_counter()
        for s in range(0, len(x), INSERT_BATCH):
            store.upsert([StoredItem(f"it{offset + i}", {"genre": f"g{g[i]:02d}"}, {}, x[i], {}, "bench")
                          for i in range(s, min(len(x), s + INSERT_BATCH))])
        per_chunk = time.perf_counter() - t
        insert_s += per_chunk
        inserted = offset + len(x)
        say(f"  server insert {inserted}/{size}: {insert_s:.0f}s ({inserted / insert_s:.0f} rows/s)")
        if inserted < size and time.perf_counter() + 2 * per_chunk > deadline:
            say(f"  stopping at {inserted} rows: the next chunk would overrun the time budget")
            break
    return inserted, insert_s


def server_size(size: int, dim: int, source, rng: np.random.Generator, queries: np.ndarray, threads: int,
                workdir: str, budget_s: float, say: Callable[[str], None]) -> tuple[list[dict], dict]:
    """One size on a fresh server: insert (within ``budget_s``), flush, wait for the index, search."""
    from fusionrec.bench.retrieval import FILTER, K, _chunks, _fmt, _measure, _truths
    from fusionrec.retrieval.milvus import MilvusStore

    launcher, why = server_launcher()
    if launcher is None:
        return [], {"size": size, "backend": "milvus-server", "skipped": why}
    schema = StoreSchema(modality_dims={}, fused_dim=dim, encoder_versions={}, model_version="bench")
    truth = _truths(queries)
    deadline = time.perf_counter() + budget_s
    with launcher(Path(workdir) / f"milvus-server-{size}") as server:
        store = MilvusStore(server.uri, schema, search_backend="milvus")
        try:
            inserted, insert_s = _insert(store, size, _chunks(size, source, rng, truth, chunk=50_000), deadline, say)
            t = time.perf_counter()
            store.flush()
            indexed = wait_indexed(server.uri, max(deadline, time.perf_counter() + 120))
            index_s = time.perf_counter() - t
            say(f"  server flush + HNSW index: {index_s:.0f}s ({indexed})")
            rows = []
            for filtered in (False, True):
                f = FILTER if filtered else None
                search = lambda q, f=f: [c.item_id for c in store.search(q, K, filters=f)]  # noqa: E731
                row = _measure("milvus-server", inserted, search, queries, truth[filtered].sets(),
                               lambda r: [int(i[2:]) for i in r], threads, filtered)
                rows.append(row | {"requested_size": size})
                say("  " + _fmt(row))
        finally:
            store.close()
    info = {"size": size, "backend": "milvus-server", "built": inserted, "server_insert_s": insert_s,
            "server_rows_per_s": inserted / max(insert_s, 1e-9), "server_flush_index_s": index_s, **indexed}
    return rows, info
