"""Shared helpers and fixtures of the MilvusStore tests (test_store_milvus*.py), against a real Milvus Lite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fusionrec.retrieval.base import InteractionEvent, StoredItem, StoreSchema  # noqa: E402
from fusionrec.retrieval.milvus import MilvusStore  # noqa: E402

FUSED_DIM = 16
DIMS = {"text": 8, "image": 6}
GENRES = ["rock", "pop", "jazz", "folk"]


def make_schema(**changes) -> StoreSchema:
    base = dict(
        modality_dims=dict(DIMS),
        fused_dim=FUSED_DIM,
        encoder_versions={"text": "minilm-v1", "image": "effnet-v1"},
        model_version="fusion-1",
    )
    base.update(changes)
    return StoreSchema(**base)


def vec(rng: np.random.Generator, dim: int) -> np.ndarray:
    return rng.standard_normal(dim).astype(np.float32)


def item(item_id: str, rng: np.random.Generator, attrs=None, modalities=("text", "image"), fused=None):
    return StoredItem(
        item_id=item_id,
        attributes=dict(attrs or {}),
        modality_vectors={m: vec(rng, DIMS[m]) for m in modalities},
        fused=vec(rng, FUSED_DIM) if fused is None else fused,
        encoder_versions={m: make_schema().encoder_versions[m] for m in modalities},
        model_version="fusion-1",
    )


def assert_same_item(got: StoredItem, want: StoredItem) -> None:
    assert got.item_id == want.item_id
    assert got.attributes == want.attributes
    for k, v in want.attributes.items():
        assert type(got.attributes[k]) is type(v), k
    assert set(got.modality_vectors) == set(want.modality_vectors)
    for m, v in want.modality_vectors.items():
        assert got.modality_vectors[m].dtype == np.float32
        np.testing.assert_array_equal(got.modality_vectors[m], v)
    assert got.fused.dtype == np.float32
    np.testing.assert_array_equal(got.fused, want.fused)
    assert got.encoder_versions == want.encoder_versions
    assert got.model_version == want.model_version


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "store.db")


BACKENDS = ["memory", "milvus"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store(db_path: str, backend: str):
    s = MilvusStore(db_path, make_schema(), search_backend=backend)
    yield s
    s.close()


# --------------------------------------------------------------------------- catalog

N_ITEMS = 500


@pytest.fixture(scope="module", params=BACKENDS)
def catalog(tmp_path_factory, request):
    """500 clustered items with attributes, in one store per search backend."""
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((10, FUSED_DIM)).astype(np.float32) * 3
    fused = (centers[rng.integers(0, 10, N_ITEMS)] + rng.standard_normal((N_ITEMS, FUSED_DIM))).astype(
        np.float32
    )
    items = []
    for i in range(N_ITEMS):
        attrs = {
            "genre": GENRES[i % 4],
            "year": 1960 + (i % 60),
            "rating": round(float(rng.uniform(0, 5)), 3),
            "live": i % 3 == 0,
        }
        if i % 10 == 0:
            del attrs["rating"]  # some items lack an attribute
        items.append(item(f"item-{i}", rng, attrs, fused=fused[i]))
    path = str(tmp_path_factory.mktemp("catalog") / "catalog.db")
    s = MilvusStore(path, make_schema(), search_backend=request.param)
    s.upsert(items)
    yield s, items, fused, rng
    s.close()


def brute_force(fused, items, q, k, keep=lambda it: True, exclude=()):
    scores = fused @ q
    order = [i for i in np.argsort(-scores) if keep(items[i]) and items[i].item_id not in exclude]
    return [(items[i].item_id, float(scores[i])) for i in order[:k]]


def assert_matches(got, want, fused_by_id):
    assert len(got) == len(want)
    scores = [c.score for c in got]
    assert scores == sorted(scores, reverse=True)
    # the returned items' true scores equal the brute-force top-k scores (robust to near ties)
    np.testing.assert_allclose(scores, [s for _, s in want], rtol=1e-5, atol=1e-4)
    assert [c.item_id for c in got] == [i for i, _ in want]
    for c in got:
        np.testing.assert_array_equal(c.fused, fused_by_id[c.item_id])


def ev(user, item_id, ts, kind="click"):
    return InteractionEvent(user_id=user, item_id=item_id, kind=kind, timestamp_s=ts)
