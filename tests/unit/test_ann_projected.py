"""VectorIndex once IVF lists over the reduced projection serve it: exact scores, recall, masks, deletes, refit."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

from fusionrec.retrieval.ann import VectorIndex, fit_projection  # noqa: E402

DIM, LATENT = 96, 12


def clustered(n: int, seed: int, basis_seed: int = 0) -> np.ndarray:
    """Low-rank clustered rows plus isotropic noise, unit norm (real embeddings' shape, small)."""
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(basis_seed)
    centers = fixed.standard_normal((30, LATENT))
    basis = fixed.standard_normal((LATENT, DIM))
    x = (centers[rng.integers(0, 30, n)] + 0.5 * rng.standard_normal((n, LATENT))) @ basis
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x += 0.3 / np.sqrt(DIM) * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact(x: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[int]:
    s = x @ q
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    return [int(i) for i in np.argsort(-s)[:k] if np.isfinite(s[i])]


@pytest.fixture(scope="module")
def built():
    x = clustered(8000, seed=1)
    idx = VectorIndex(DIM, reduced_dim=24, reduce_at=3000, exact_max_rows=200, nprobe=8)
    idx.add(x[:2000])
    assert not idx.projected  # below reduce_at: an HNSW graph over the full vectors
    idx.add(x[2000:5000])  # crosses reduce_at: fitted on these 5000 rows
    assert idx.projected
    idx.add(x[5000:])  # later rows go through the same projection
    return x, idx


def test_projection_keeps_the_top_second_moment_directions():
    x = clustered(4000, seed=2)
    p = fit_projection(x, 24)
    assert p.shape == (DIM, 24)
    np.testing.assert_allclose(p.T @ p, np.eye(24), atol=1e-4)
    kept = np.linalg.norm(x @ p, axis=1) ** 2  # share of each unit row's energy in the subspace
    rand = np.linalg.qr(np.random.default_rng(0).standard_normal((DIM, 24)))[0]
    assert kept.mean() > 0.9 > (np.linalg.norm(x @ rand, axis=1) ** 2).mean()


@pytest.mark.parametrize("share", [None, 0.5, 0.08, 0.02])
def test_projected_search_recall_and_exact_scores(built, share):
    """No mask: nprobe lists; 50 % and 8 % (640 rows): masked lists, nprobe scaled up; 2 % (160 rows): the
    exact scan of the full vectors."""
    x, idx = built
    mask = None if share is None else np.random.default_rng(3).random(len(x)) < share
    recalls = []
    for q in clustered(30, seed=4):
        slots, scores = idx.search(q, 50, mask)
        assert len(slots) == 50 and len(set(slots.tolist())) == 50
        assert np.all(np.diff(scores) <= 1e-6)  # best first
        np.testing.assert_allclose(scores, x[slots] @ q, rtol=1e-5, atol=1e-5)  # re-scored on full vectors
        if mask is not None:
            assert mask[slots].all()
        recalls.append(len(set(slots.tolist()) & set(exact(x, q, 50, mask))) / 50)
    assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_projected_deletes_and_compaction(built):
    x, _ = built
    idx = VectorIndex(DIM, reduced_dim=24, reduce_at=3000)
    idx.add(x)
    dead = np.arange(0, len(x), 2)
    idx.remove(dead)
    live = np.ones(len(x), bool)
    live[dead] = False
    q = x[0]
    slots, _ = idx.search(q, 40)
    assert live[slots].all()
    assert len(set(slots.tolist()) & set(exact(x, q, 40, live))) >= 38
    fresh, old = idx.compacted()  # 4000 live rows >= reduce_at: projected again, refitted on them
    assert fresh.projected and fresh.n_slots == live.sum()
    s2, sc2 = fresh.search(q, 40)
    np.testing.assert_allclose(sc2, x[old[s2]] @ q, rtol=1e-5, atol=1e-5)
    assert len(set(old[s2].tolist()) & set(exact(x, q, 40, live))) >= 38
    np.testing.assert_array_equal(fresh.vectors(s2), x[old[s2]])


def test_refits_when_grown_and_follows_a_new_distribution():
    """Fitted on 3000 rows of one distribution, then 4x the rows from another: without a refit the
    projection would drop the new rows' directions and the lists would not split them."""
    old = clustered(3000, seed=5, basis_seed=1)
    new = clustered(9000, seed=6, basis_seed=2)
    idx = VectorIndex(DIM, reduced_dim=24, reduce_at=3000, nprobe=4)
    idx.add(old)
    idx.add(new)  # 12000 rows = 4 x 3000: refitted on both
    x = np.concatenate([old, new])
    recalls = [len(set(idx.search(q, 30)[0].tolist()) & set(exact(x, q, 30))) / 30
               for q in clustered(20, seed=7, basis_seed=2)]
    assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_small_dims_are_never_projected():
    idx = VectorIndex(32, reduced_dim=24, reduce_at=10)  # 2 x 24 > 32: projecting would save little
    idx.add(np.random.default_rng(0).standard_normal((100, 32)).astype(np.float32))
    assert not idx.projected
