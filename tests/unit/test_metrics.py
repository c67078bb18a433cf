"""Ranking metrics against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from fusionrec.fusion.train.metrics import ndcg_at, ranking_metrics, topk_items


def test_hand_computed_two_users():
    # user 0: positives {1, 5}; ranked [1, 2, 5, 3] -> hits at ranks 1 and 3.
    # user 1: positives {9};    ranked [4, 9, 0, 2] -> hit at rank 2.
    topk = np.array([[1, 2, 5, 3], [4, 9, 0, 2]])
    pos = [np.array([1, 5]), np.array([9])]
    m = ranking_metrics(topk, pos, n_items=10, ks=(2, 4))
    assert m["recall@2"] == pytest.approx((1 / 2 + 1 / 1) / 2)
    assert m["recall@4"] == pytest.approx((2 / 2 + 1) / 2)
    assert m["precision@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["precision@4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    ndcg0_4 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg1_4 = (1 / math.log2(3)) / 1
    assert m["ndcg@4"] == pytest.approx((ndcg0_4 + ndcg1_4) / 2)
    ndcg0_2 = 1 / (1 + 1 / math.log2(3))
    assert m["ndcg@2"] == pytest.approx((ndcg0_2 + 1 / math.log2(3)) / 2)
    assert m["coverage@2"] == pytest.approx(4 / 10)  # items 1, 2, 4, 9
    assert m["coverage@4"] == pytest.approx(7 / 10)


def test_recall_divides_by_all_positives_and_ideal_caps_at_k():
    # 3 positives, K=2, both top slots hit: recall 2/3 (MMRec), NDCG 1 (ideal has min(K, 3) = 2 hits).
    hits = np.array([[True, True]])
    assert ranking_metrics(np.array([[0, 1]]), [np.array([0, 1, 2])], 5, ks=(2,))["recall@2"] == pytest.approx(2 / 3)
    assert ndcg_at(hits, np.array([3]), 2)[0] == pytest.approx(1.0)


def test_users_without_positives_are_skipped():
    m = ranking_metrics(np.array([[0, 1], [2, 3]]), [np.array([0]), np.array([], dtype=np.int64)], 4, ks=(1,))
    assert m["users"] == 1 and m["recall@1"] == 1.0


def test_topk_excludes_train_items():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    top = topk_items(lambda users: scores[torch.as_tensor(users)], np.array([0, 1]),
                     [np.array([0]), np.array([3, 2])], k=2)
    assert top.tolist() == [[1, 2], [1, 0]]
