"""Cold-start borrowing (fusionrec.fusion.cold) against hand-computed cases."""

import numpy as np
import torch

from fusionrec.fusion.cold import ColdStart, content_keys, neighbours


def _unit(*rows):
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_neighbours_keep_the_k_most_similar_with_weights_from_positive_cosines():
    keys = _unit([1, 0], [0, 1], [-1, 0], [1, 1])
    idx, w = neighbours(_unit([1, 0]), keys, k=2)
    # cos to the query: 1, 0, -1, 0.7071 -> keys 0 and 3, weights 1 : 0.7071 normalised
    order = np.argsort(idx[0])
    assert idx[0][order].tolist() == [0, 3]
    np.testing.assert_allclose(w[0][order], [1 / 1.70711, 0.70711 / 1.70711], rtol=1e-4)
    # A query unlike every key borrows nothing.
    idx, w = neighbours(_unit([-1, -1]), _unit([1, 0], [0, 1]), k=2)
    np.testing.assert_allclose(w, 0.0)
    # k larger than the warm set: all of it.
    assert neighbours(_unit([1, 0]), keys[:1], k=5)[0].shape == (1, 1)


def test_content_keys_average_the_modalities_cosines():
    means = {"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32)}
    feats = {"a": np.array([[3, 0], [0, 2]], np.float32), "b": np.array([[2, 1], [2, 1]], np.float32)}
    keys = content_keys(feats, means)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, rtol=1e-6)
    # cos_a = 0 (orthogonal), cos_b = 1 (same centred direction) -> key cosine 0.5
    np.testing.assert_allclose(keys[0] @ keys[1], 0.5, rtol=1e-6)


def test_borrow_mixes_own_and_neighbours_then_renormalises():
    feats = {"text": np.array([[1, 0], [0, 1]], np.float32)}
    cold = ColdStart.fit(feats, np.array([True, True]), ("text",), k=1, share=0.5)
    warm = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    own = torch.tensor([[1.0, 0.0, 0.0]])
    out = cold.borrow(own, {"text": np.array([[2, 0.1]], np.float32)}, warm)  # nearest: warm row 0
    np.testing.assert_allclose(out.numpy(), [[0.70711, 0.70711, 0.0]], rtol=1e-4)
    no_share = ColdStart(cold.modalities, cold.means, cold.keys, 1, 0.0)
    none = no_share.borrow(own, {"text": np.array([[2, 0]], np.float32)}, warm)
    np.testing.assert_allclose(none.numpy(), own.numpy())
    again = ColdStart.from_payload(cold.to_payload())
    np.testing.assert_allclose(again.keys, cold.keys)
    assert (again.k, again.share, again.modalities) == (1, 0.5, ("text",))
