"""VectorIndex, AttributeTable and ItemMirror without Milvus (numpy/faiss only)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

from fusionrec.retrieval.ann import VectorIndex  # noqa: E402
from fusionrec.retrieval.base import FilterSpec  # noqa: E402
from fusionrec.retrieval.mirror import ItemMirror  # noqa: E402

DIM = 32


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, 8)).astype(np.float32)
    basis = rng.standard_normal((8, DIM)).astype(np.float32)
    x = (centers[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, 8))) @ basis
    x += 0.3 * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(DIM) * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact(x, q, k, mask=None):
    s = x @ q
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    order = np.argsort(-s)[:k]
    return [i for i in order if np.isfinite(s[i])]


def recall(got, want):
    return len(set(got) & set(want)) / max(1, len(want))


@pytest.fixture(scope="module")
def data():
    x = clustered(6000)
    idx = VectorIndex(DIM, exact_max_rows=500)
    idx.add(x[:3000])
    idx.add(x[3000:])
    return x, idx


def test_hnsw_recall_unfiltered_and_masked(data):
    x, idx = data
    qs = clustered(20, seed=1)
    rng = np.random.default_rng(2)
    mask_half = rng.random(len(x)) < 0.5  # HNSW with a selector (above exact_max_rows)
    mask_small = rng.random(len(x)) < 0.05  # exact over ~300 rows
    for mask, floor in ((None, 0.95), (mask_half, 0.95), (mask_small, 1.0)):
        r = []
        for q in qs:
            slots, scores = idx.search(q, 50, mask)
            assert np.all(np.diff(scores) <= 1e-6)
            if mask is not None:
                assert mask[slots].all()
            np.testing.assert_allclose(scores, x[slots] @ q, rtol=1e-5, atol=1e-5)
            r.append(recall(slots.tolist(), exact(x, q, 50, mask)))
        assert np.mean(r) >= floor, (floor, np.mean(r))


def test_tombstones_and_compaction(data):
    x, _ = data
    idx = VectorIndex(DIM)
    idx.add(x)
    dead = np.arange(0, len(x), 3)
    idx.remove(dead)
    idx.remove(dead[:5])  # twice is harmless
    assert idx.n_live == len(x) - len(dead)
    live = np.ones(len(x), bool)
    live[dead] = False
    q = x[0]  # its own nearest neighbour is dead
    slots, _ = idx.search(q, 30)
    assert live[slots].all() and 0 not in slots
    assert recall(slots.tolist(), exact(x, q, 30, live)) >= 0.9
    fresh, old = idx.compacted()
    assert fresh.n_slots == fresh.n_live == live.sum()
    s2, _ = fresh.search(q, 30)
    assert recall(old[s2].tolist(), exact(x, q, 30, live)) >= 0.9
    assert idx.search(q, 0)[0].size == 0
    assert idx.search(q, 5, np.zeros(len(x), bool))[0].size == 0


def test_mirror_upsert_delete_compact():
    x = clustered(3000, seed=3)
    m = ItemMirror(DIM, compact_dead_fraction=0.3)
    ids = [f"i{i}" for i in range(len(x))]
    m.upsert(ids, x, [{"g": i % 10, "s": "even" if i % 2 == 0 else "odd"} for i in range(len(x))])
    m.delete(ids[:1200])  # 40 % dead: compacts
    assert len(m) == 1800 and m._index.n_slots == 1800
    hits = m.search(x[1500], 10, [FilterSpec("s", equals="even")], {"i1500"})
    assert hits and all(h.attributes["s"] == "even" and h.item_id != "i1500" for h in hits)
    assert all(int(h.item_id[1:]) >= 1200 for h in hits)
    want = exact(x, x[1500], 10, np.array([i >= 1200 and i % 2 == 0 and i != 1500 for i in range(len(x))]))
    assert [h.item_id for h in hits] == [f"i{i}" for i in want]
    m.upsert(["i0"], x[:1], [{"g": 1}])
    assert m.search(x[0], 1)[0].item_id == "i0"
