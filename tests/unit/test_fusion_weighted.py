"""Fusion v0: block structure, exact attributions, recency weighting."""

from __future__ import annotations

import numpy as np
import pytest

from fusionrec.fusion.registry import get_fusion_model

DIMS = {"text": 384, "image": 1280, "audio": 96}


@pytest.fixture
def model():
    return get_fusion_model("weighted-v0", DIMS, block_dim=64, weights={"text": 2.0, "image": 1.0, "audio": 1.0})


def _item(rng, modalities=("text", "image", "audio")):
    return {m: rng.standard_normal(DIMS[m]).astype(np.float32) for m in modalities}


def test_item_vectors_are_unit_and_deterministic(model):
    rng = np.random.default_rng(0)
    items = [_item(rng) for _ in range(5)] + [_item(rng, ("image",))]
    vecs = model.item_vectors(items)
    assert vecs.shape == (6, model.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    again = get_fusion_model("weighted-v0", DIMS, block_dim=64, weights={"text": 2.0, "image": 1.0, "audio": 1.0})
    np.testing.assert_array_equal(vecs, again.item_vectors(items))
    assert again.version == model.version
    assert get_fusion_model("weighted-v0", DIMS, block_dim=32).version != model.version


def test_contributions_add_up_and_follow_the_query_modality(model):
    rng = np.random.default_rng(1)
    items = [_item(rng) for _ in range(8)]
    vecs = model.item_vectors(items)
    user = model.user_vector(np.zeros((0, model.dim), np.float32), {"image": items[3]["image"]})
    parts = model.contributions(user, vecs)
    np.testing.assert_allclose(sum(parts.values()), vecs @ user, atol=1e-5)
    # An image-only query only touches the image block, and finds the item it came from.
    assert np.allclose(parts["text"], 0) and np.allclose(parts["audio"], 0)
    assert int(np.argmax(vecs @ user)) == 3


def test_weights_shift_the_score(model):
    rng = np.random.default_rng(2)
    item = _item(rng)
    vec = model.item_vectors([item])[0]
    parts = model.contributions(vec, vec[None])
    assert parts["text"][0] == pytest.approx(2 * parts["image"][0], rel=1e-4)


def test_user_vector_prefers_recent_history(model):
    rng = np.random.default_rng(3)
    old, new = model.item_vectors([_item(rng), _item(rng)])
    user = model.user_vector(np.stack([old, new]), {})
    assert user @ new > user @ old
    with pytest.raises(ValueError):
        model.user_vector(np.zeros((0, model.dim), np.float32), {})


def test_wrong_inputs_fail_loudly(model):
    with pytest.raises(ValueError, match="unknown modality"):
        model.item_vectors([{"smell": np.ones(3, np.float32)}])
    with pytest.raises(ValueError, match="expected"):
        model.item_vectors([{"text": np.ones(3, np.float32)}])
    with pytest.raises(ValueError, match="unknown fusion model"):
        get_fusion_model("nope", DIMS)
