"""The Lite flush policy bounds what a store keeps unflushed by bytes as well as rows: a soak that rewrites
the same items with wide vectors (an image encoder's 1280 floats) must not hold thousands of row versions
in Milvus Lite's memtable (about 1-2 bytes of RSS per row byte) until the row count is reached."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("milvus_lite")

from fusionrec.fusion.registry import get_fusion_model  # noqa: E402
from fusionrec.retrieval.base import StoredItem, StoreSchema  # noqa: E402
from fusionrec.retrieval.connection import FLUSH_EVERY_BYTES_LITE, LITE_BYTES_PER_WRITE_CALL  # noqa: E402
from fusionrec.retrieval.engine import RetrievalEngine  # noqa: E402

DIMS = {"image": 1280}


def _engine(tmp_path, **kw) -> tuple[RetrievalEngine, list[str]]:
    model = get_fusion_model("weighted-v0", DIMS)
    schema = StoreSchema(modality_dims=dict(DIMS), fused_dim=model.dim, encoder_versions={"image": "v1"},
                         model_version=model.version)
    engine = RetrievalEngine.open(str(tmp_path / "store.db"), schema, search_backend="memory", **kw)
    flushed: list[str] = []
    client = engine.store._conn.client
    real = client.flush

    def counting_flush(name, *a, **k):
        flushed.append(name)
        return real(name, *a, **k)

    client.flush = counting_flush  # the real flush, counted
    return engine, flushed


def _rewrite(engine: RetrievalEngine, n: int) -> None:
    """``n`` upserts of one item each, over 16 ids: the data does not grow, only row versions do."""
    rng = np.random.default_rng(0)
    model = get_fusion_model("weighted-v0", DIMS)
    for i in range(n):
        vec = {"image": rng.standard_normal(1280).astype(np.float32)}
        item_id = f"item-{i % 16}"
        engine.upsert([StoredItem(item_id, {}, vec, model.item_vectors([vec], [item_id])[0], {"image": "v1"},
                                  model.version)])


def test_wide_rewrites_are_flushed_by_bytes_long_before_the_row_count(tmp_path):
    engine, flushed = _engine(tmp_path)
    try:
        # the packed modality-vectors row as the writer counts it, one write call per item
        per_write = 4 * (1280 + 2) + 512 + LITE_BYTES_PER_WRITE_CALL
        rows = 2 * FLUSH_EVERY_BYTES_LITE // per_write + 10  # two flushes' worth, far below 8192 rows
        _rewrite(engine, rows)
        vectors = [name for name in flushed if name.endswith("modality_vectors")]
        assert len(vectors) == 2, flushed
        assert engine.count() == 16
    finally:
        engine.close()


def test_no_flush_when_flushing_is_off(tmp_path):
    engine, flushed = _engine(tmp_path, flush_every_rows=0)
    try:
        _rewrite(engine, 2 * FLUSH_EVERY_BYTES_LITE // (4 * 1282 + 512 + LITE_BYTES_PER_WRITE_CALL) + 10)
        assert flushed == [] and engine.count() == 16
    finally:
        engine.close()


def test_interaction_bytes_count_toward_the_flush(tmp_path):
    """Plain (auto-id) interaction rows are counted by bytes like every other write: 2,100 events of ~1 KB
    (by the writer's estimate) pass the byte limit long before the 8,192-row count."""
    from fusionrec.retrieval.base import InteractionEvent

    engine, flushed = _engine(tmp_path)
    try:
        _rewrite(engine, 1)
        events = [InteractionEvent("user-1", "item-0", "view", 1_700_000_000.0 + i) for i in range(2_100)]
        assert engine.record_interactions(events) == 2_100
        assert [name for name in flushed if name.endswith("interactions")] == ["interactions"], flushed
        assert len(engine.store.history("user-1", 5_000)) == 2_100
    finally:
        engine.close()


def test_one_event_writes_count_what_each_write_call_holds(tmp_path):
    """A write call holds its own record batch in Lite's memtable (~6 KB, whatever its rows' size): one-event
    interaction inserts reach the byte limit after ~2 MiB / (1 KB + 6 KB) calls, not after 2,048 of them."""
    from fusionrec.retrieval.base import InteractionEvent

    engine, flushed = _engine(tmp_path)
    try:
        _rewrite(engine, 1)
        calls = FLUSH_EVERY_BYTES_LITE // (1024 + LITE_BYTES_PER_WRITE_CALL) + 1
        for i in range(calls - 1):
            engine.record_interactions([InteractionEvent("user-1", "item-0", "view", 1_700_000_000.0 + i)])
        assert not [name for name in flushed if name.endswith("interactions")]
        engine.record_interactions([InteractionEvent("user-1", "item-0", "view", 1_800_000_000.0)])
        assert [name for name in flushed if name.endswith("interactions")] == ["interactions"], flushed
    finally:
        engine.close()
