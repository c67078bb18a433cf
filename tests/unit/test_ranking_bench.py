"""The service-level ranking benchmark's own logic (bench/ranking_service.py): how it tells a phase's mode
from an answer, and how it pools phases into figures and ratios."""

from __future__ import annotations

import pytest

from fusionrec.bench.ranking_service import _ranked_by_ranker, summarise
from fusionrec.v1 import recommender_pb2 as pb


def _reply(*items: tuple[float, list[float]]) -> pb.RecommendResponse:
    return pb.RecommendResponse(items=[
        pb.ScoredItem(item_id=f"i{n}", score=score,
                      contributions=[pb.ModalityContribution(modality=f"m{j}", score=c) for j, c in enumerate(parts)])
        for n, (score, parts) in enumerate(items)])


def test_a_retrieval_answer_is_the_sum_of_its_contributions_and_a_ranked_one_is_not():
    assert _ranked_by_ranker(_reply((0.9, [0.5, 0.4]), (0.7, [0.3, 0.4000001]))) is False
    assert _ranked_by_ranker(_reply((0.9, [0.5, 0.4]), (2.1, [0.3, 0.4]))) is True  # one re-scored item is enough
    assert _ranked_by_ranker(_reply()) is None


def test_phases_pool_per_mode_and_pair():
    phases = [{"pair": p, "mode": m, "samples_ms": samples, "p50_ms": samples[1], "p99_ms": samples[2]}
              for p, m, samples in ((0, "retrieval", [1.0, 2.0, 3.0]), (0, "ranking", [2.0, 3.0, 6.0]),
                                    (1, "retrieval", [1.0, 2.0, 3.0]), (1, "ranking", [2.0, 4.0, 6.0]))]
    out = summarise(phases, n_items=10, n_users=2, requests=3, candidates_n=5)
    assert out["retrieval"]["p50_ms"] == 2.0 and out["ranking"]["p50_ms"] == 3.5
    assert out["p50_ratio"] == pytest.approx(1.75)
    assert [p["p50_ratio"] for p in out["pairs"]] == [pytest.approx(1.5), pytest.approx(2.0)]
    assert all("samples_ms" not in p for p in out["phases"]) and out["level"].startswith("service")
