"""One rule set (core/rules.py) for the edge and the store: what one refuses, the other refuses too,
always as InvalidArgument, and the domain errors stay free of gRPC until gateway/errors.py maps them."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest

from fusionrec.core.errors import InvalidArgument, NotFound
from fusionrec.encoders.base import InvalidContent
from fusionrec.gateway.config import LimitsConfig
from fusionrec.gateway.domain import InteractionEvent, ItemInput, QueryContent, RecommendQuery
from fusionrec.gateway.errors import to_status
from fusionrec.gateway.validation import check_interactions, check_items, check_recommend
from fusionrec.retrieval.base import SchemaMismatch
from fusionrec.retrieval.milvus import MilvusStore
from milvus_store_support import ev, item, make_schema

ASTRAL_ID = "\U0001F600" * 65  # 65 characters, 260 UTF-8 bytes: the store's ids hold 256 bytes
LIMITS = LimitsConfig()


def _query(user_id: str) -> RecommendQuery:
    return RecommendQuery(user_id=user_id, history_item_ids=[], query=QueryContent(), k=5, filters=[],
                          exclude_item_ids=[])


def _item_input(item_id: str, attributes: dict) -> ItemInput:
    return ItemInput(item_id=item_id, attributes=attributes, content=QueryContent(),
                     vectors={"text": np.ones(8, np.float32)})


@pytest.fixture
def store(tmp_path):
    s = MilvusStore(str(tmp_path / "rules.db"), make_schema())
    yield s
    s.close()


def test_an_id_over_256_utf8_bytes_is_refused_by_edge_and_store(store):
    with pytest.raises(InvalidArgument, match="260 bytes in UTF-8; the limit is 256"):
        check_recommend(_query(ASTRAL_ID), LIMITS)
    with pytest.raises(InvalidArgument, match="260 bytes in UTF-8; the limit is 256"):
        check_items([_item_input(ASTRAL_ID, {})], LIMITS, {"text": 8}, set())
    with pytest.raises(InvalidArgument, match="260 bytes"):
        store.upsert([item(ASTRAL_ID, np.random.default_rng(0))])
    check_recommend(_query("\U0001F600" * 64), LIMITS)  # 256 bytes: fits both
    store.upsert([item("\U0001F600" * 64, np.random.default_rng(0))])


@pytest.mark.parametrize("name", ["genre\n", "1genre", "gen-re", "g" * 65, ""])
def test_a_bad_attribute_name_is_refused_by_edge_and_store(store, name):
    with pytest.raises(InvalidArgument, match="not a valid attribute name"):
        check_items([_item_input("a", {name: "rock"})], LIMITS, {"text": 8}, set())
    with pytest.raises(InvalidArgument, match="not a valid attribute name"):
        store.upsert([item("a", np.random.default_rng(0), attrs={name: "rock"})])


def test_a_kind_over_64_bytes_is_refused_by_edge_and_store(store):
    kind = "\u00e9" * 40  # 40 characters, 80 bytes
    events = [InteractionEvent(user_id="u", item_id="a", kind=kind, timestamp_s=1.0)]
    with pytest.raises(InvalidArgument, match=r"interactions\[0\].kind is 80 bytes"):
        check_interactions(events, LIMITS)
    store.upsert([item("a", np.random.default_rng(0))])
    with pytest.raises(InvalidArgument, match="80 bytes"):
        store.record_interactions([ev("u", "a", 1.0, kind=kind)])


def test_id_limit_config_cannot_exceed_what_the_store_holds():
    with pytest.raises(ValueError, match="less than or equal to 256"):
        LimitsConfig(max_id_bytes=300)


@pytest.mark.parametrize("exc, code", [
    (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidContent("image", "truncated"), grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (SchemaMismatch("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL),
])
def test_domain_errors_map_to_status_codes_at_the_edge_only(exc, code):
    assert to_status(exc)[0] == code


def test_core_and_engines_import_no_grpc():
    code = ("import sys, fusionrec.core.rules, fusionrec.retrieval.engine, fusionrec.encoders.base;"
            "bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'ray')));"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("values, fragment", [
    ([1e30, 0, 0, 0, 0, 0, 0, 0], "beyond"),  # would overflow to NaN in fusion
    ([1e-40] * 8, "denormal"),  # would fuse to zero
    ([0.0] * 8, "all zero"),
    ([float("nan")] + [1.0] * 7, "finite"),
])
def test_bring_your_own_vectors_must_be_usable(values, fragment):
    item = ItemInput(item_id="a", attributes={}, content=QueryContent(),
                     vectors={"text": np.asarray(values, np.float32)})
    with pytest.raises(InvalidArgument, match=fragment):
        check_items([item], LIMITS, {"text": 8}, set())


def test_delete_batches_are_bounded_before_any_call():
    import asyncio

    from fusionrec.gateway.config import ServerConfig
    from fusionrec.gateway.pipeline import Recommender

    recommender = Recommender({}, None, None, LimitsConfig(max_delete_batch=3), ServerConfig())
    with pytest.raises(InvalidArgument, match="4 item_ids in one call; the limit is 3"):
        asyncio.run(recommender.delete(["a", "b", "c", "d"]))  # no retrieval behind it: refused first
