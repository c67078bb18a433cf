"""`fusionrec train --from-store`, the Ray-free part: hold-out split, snapshot -> data, generic evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusionrec.fusion.base import FusionModel
from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.from_store import (evaluate_model, is_better, leave_latest_out, snapshot_data,
                                               train_from_snapshot, write_report)
from fusionrec.fusion.trained import TrainedFusion


class Cosine(FusionModel):
    """Items = their unit "x" vector; user = unit mean of the history; one part."""

    name = "cosine"
    version = "cosine@test"
    dim = 2

    def item_vectors(self, items, item_ids=None):
        x = np.stack([item["x"] for item in items]).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def user_vector(self, history, query):
        mean = history.mean(0)
        return (mean / np.linalg.norm(mean)).astype(np.float32)

    def contributions(self, user, items):
        return {"x": items @ user}


def rows(a):
    return [tuple(r) for r in a.tolist()]


def test_leave_latest_out_holds_out_each_users_latest_and_keeps_short_users_whole():
    train, valid, test = leave_latest_out([np.array([0, 1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8]),
                                           np.array([0, 1, 2, 1])])
    assert rows(train) == [(0, 0), (0, 1), (1, 4), (1, 5), (2, 6), (2, 7), (3, 0), (3, 1)]
    assert rows(valid) == [(0, 2), (3, 2)]  # the event before the hold-out validates, when enough remain
    assert rows(test) == [(0, 3), (2, 8)]  # user 1 is too short; user 3's latest is a replay of a seen item


def test_leave_latest_out_more_than_one():
    train, valid, test = leave_latest_out([np.arange(6)], holdout=2, min_train=2)
    assert rows(train) == [(0, 0), (0, 1), (0, 2)] and rows(valid) == [(0, 3)] and rows(test) == [(0, 4), (0, 5)]


def snapshot(n_items=4):
    rng = np.random.default_rng(0)
    present = {"text": np.ones(n_items, bool), "image": np.ones(n_items, bool)}
    present["image"][1] = False  # item-1 came with text only
    vectors = {"text": rng.normal(size=(n_items, 3)).astype(np.float32),
               "image": rng.normal(size=(n_items, 5)).astype(np.float32),
               "clap": np.zeros((n_items, 2), np.float32)}  # a precomputed modality no item has
    vectors["image"][1] = 0
    present["clap"] = np.zeros(n_items, bool)
    events = [("u2", "item-3", 5.0), ("u1", "item-0", 1.0), ("u1", "item-2", 3.0), ("u1", "item-1", 2.0),
              ("u1", "item-3", 4.0), ("u2", "gone", 6.0)]  # unordered; "gone" is no stored item
    return {"item_ids": [f"item-{i}" for i in range(n_items)], "vectors": vectors, "present": present,
            "events": events, "modality_dims": {"text": 3, "image": 5, "clap": 2},
            "encoder_versions": {"text": "minilm@abc", "image": "effnet@def"}, "model_version": "weighted-v0@x"}


def test_snapshot_becomes_interaction_data():
    snap = snapshot()
    data = snapshot_data(snap)
    assert (data.n_users, data.n_items, data.item_names) == (2, 4, snap["item_ids"])
    assert {m: x.shape for m, x in data.features.items()} == {"text": (4, 3), "image": (4, 5)}  # clap: nobody has it
    assert data.present["image"].tolist() == [True, False, True, True]
    np.testing.assert_allclose(data.features["image"][1], snap["vectors"]["image"][[0, 2, 3]].mean(0), rtol=1e-6)
    assert data.encoder_versions == {"text": "minilm@abc", "image": "effnet@def"}
    # u1 in time order: item-0, item-1, item-2, item-3 -> train 0, 1; valid 2; test 3. u2 (one event) trains.
    assert rows(data.train) == [(0, 0), (0, 1), (1, 3)] and rows(data.valid) == [(0, 2)]
    assert rows(data.test) == [(0, 3)]


def test_evaluate_model_ranks_as_served_on_a_hand_made_case():
    x = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], np.float32)
    data = InteractionData("toy", 2, 4, train=np.array([[0, 0], [1, 2]]), valid=np.zeros((0, 2), np.int64),
                           test=np.array([[0, 1], [1, 1]]), features={"x": x}, encoder_versions={}, split="",
                           item_names=["a", "b", "c", "d"])
    got = evaluate_model(Cosine({"x": 2}), data, ks=(1, 2))
    # user 0 (history a): b first -> hit at 1. user 1 (history c): d, then b -> hit at 2.
    assert got["recall@1"] == pytest.approx(0.5) and got["recall@2"] == pytest.approx(1.0)
    assert got["ndcg@1"] == pytest.approx(0.5)
    assert got["ndcg@2"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    assert got["users"] == 2


def test_better_means_higher_recall_then_ndcg():
    assert is_better({"recall@20": 0.6, "ndcg@20": 0.1}, {"recall@20": 0.5, "ndcg@20": 0.3})
    assert not is_better({"recall@20": 0.6, "ndcg@20": 0.1}, {"recall@20": 0.5, "ndcg@20": 0.3}, min_gain=0.2)
    assert is_better({"recall@20": 1.0, "ndcg@20": 0.4}, {"recall@20": 1.0, "ndcg@20": 0.3})
    assert not is_better({"recall@20": 1.0, "ndcg@20": 0.3}, {"recall@20": 1.0, "ndcg@20": 0.3})


def test_train_from_snapshot_writes_a_servable_checkpoint_keyed_by_store_ids(tmp_path):
    rng = np.random.default_rng(1)
    n_items, users = 30, 8
    snap = snapshot(n_items)
    snap["events"] = [(f"u{u}", f"item-{int(i)}", float(t)) for u in range(users)
                      for t, i in enumerate(rng.choice(n_items, size=6, replace=False))]
    served = Cosine({"x": 2})
    served.item_vectors = lambda items, ids=None: rng.normal(size=(len(items), 2)).astype(np.float32)
    report = train_from_snapshot(snap, served, variant="full", checkpoint_dir=tmp_path, epochs=2, patience=2,
                                 block_dim=8, hidden=16)
    assert report["hold_out"]["users"] == users and report["candidate"]["users"] == users
    assert set(report["served"]) >= {"model_version", "recall@20", "ndcg@20"} and not report["promoted"]
    model = TrainedFusion(snap["modality_dims"], report["checkpoint"], snap["encoder_versions"])
    assert model.version == report["candidate"]["model_version"] and model.parts == ["text", "image", "id"]
    assert set(model._row) <= set(snap["item_ids"])  # ids of the store, not dataset rows
    path = write_report(report)
    assert path.parent == tmp_path and json.loads(path.read_text())["checkpoint"] == report["checkpoint"]


@pytest.mark.parametrize("query_weight", [0.0, 1.0])
def test_the_query_loss_lets_a_one_modality_query_score_the_others(tmp_path, query_weight):
    """Untrained, the query path passes a text query's own block only (other blocks score 0); the query
    loss (FusionNet.query_loss) trains it to fill the image block too, as TrainedFusion serves it."""
    rng = np.random.default_rng(2)
    n_items, users = 30, 8
    snap = snapshot(n_items)
    snap["events"] = [(f"u{u}", f"item-{int(i)}", float(t)) for u in range(users)
                      for t, i in enumerate(rng.choice(n_items, size=6, replace=False))]
    report = train_from_snapshot(snap, None, variant="content", checkpoint_dir=tmp_path, epochs=3, patience=3,
                                 block_dim=8, hidden=16, query_weight=query_weight)
    model = TrainedFusion(snap["modality_dims"], report["checkpoint"], snap["encoder_versions"])
    items = model.item_vectors([{m: snap["vectors"][m][i] for m in ("text", "image")} for i in range(n_items)])
    user = model.user_vector(np.zeros((0, model.dim), np.float32), {"text": snap["vectors"]["text"][0]})
    image = np.abs(model.contributions(user, items)["image"]).sum()
    assert (image > 1e-3) == (query_weight > 0), image
