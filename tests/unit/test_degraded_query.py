"""Recommend degrades instead of failing, without Ray: the app's own classes in one process (the real text
encoder, Fusion, Retrieval on Milvus Lite; local_app_support). An encoder that health reports without a live
replica is skipped, not waited for; an encoder that never answers gets only its share of the deadline and
retrieval still has time to answer."""

from __future__ import annotations

import asyncio
import time

import pytest

from fusionrec.gateway import convert
from fusionrec.gateway.config import LimitsConfig, ServerConfig
from fusionrec.gateway.pipeline import Recommender
from fusionrec.v1 import recommender_pb2 as pb
from local_app_support import LocalApp, LocalHandle



class _NeverAnswers:
    """An encoder whose calls never come back (a deployment whose requests wait for a replica forever)."""

    def __init__(self, info: dict) -> None:
        self._info = info
        self.calls = 0

    def info(self) -> dict:
        return self._info

    async def encode(self, content):
        self.calls += 1
        await asyncio.Event().wait()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    app = LocalApp(tmp_path_factory.mktemp("degraded"))
    yield app
    app.close()


def _recommender(local: LocalApp, text_handle, cfg: ServerConfig) -> Recommender:
    recommender = Recommender({"text": text_handle}, local._fusion, LocalHandle(local._retrieval), LimitsConfig(), cfg)
    local._loop.call(recommender.load())
    return recommender


def _ask(local: LocalApp, recommender: Recommender, deadline_s: float):
    q = convert.recommend_from_pb(pb.RecommendRequest(user_id="someone", k=3, query=pb.Content(text="a calm cat")))
    return local._loop.call(recommender.recommend(q, time.monotonic() + deadline_s))


def test_an_encoder_reported_down_is_skipped_not_waited_for(local):
    never = _NeverAnswers(local._encoders["text"]._target.info())
    recommender = _recommender(local, LocalHandle(never), ServerConfig())
    recommender.down = lambda name: True  # what HealthWatcher.is_down says while no replica is live
    rec = _ask(local, recommender, 5.0)
    assert rec.degraded and "no live replica" in rec.modalities_dropped["text"]
    assert never.calls == 0


def test_an_encoder_that_never_answers_leaves_retrieval_its_share_of_the_deadline(local):
    never = _NeverAnswers(local._encoders["text"]._target.info())
    # ranking_reserve_ms 1 alone would leave retrieval 1 ms: encode_budget_share keeps 30 % of 1 s for it.
    recommender = _recommender(local, LocalHandle(never), ServerConfig(ranking_reserve_ms=1, encode_budget_share=0.7))
    rec = _ask(local, recommender, 1.0)
    assert never.calls == 1
    why = rec.modalities_dropped["text"]
    assert rec.degraded and why.startswith("deadline: encoder took longer than "), why
    # 70 % of what was left of the 1 s when the encoder was called (the loop thread starts a moment later)
    assert 650 <= int(why.split("longer than ")[1].split(" ms")[0]) <= 700, why
