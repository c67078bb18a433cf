"""Data semantics of writes, on a real Milvus Lite: idempotent interactions (event ids), timestamps refused
beyond the configured skew, and upserts that are all or nothing across the two collections they write
(a failure injected between the writes, then the store reopened or written again)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from milvus_store_support import assert_same_item, item, make_schema
from fusionrec.core.errors import InvalidArgument
from fusionrec.gateway.config import LimitsConfig
from fusionrec.gateway.validation import check_interactions
from fusionrec.retrieval.base import InteractionEvent
from fusionrec.retrieval.milvus import MilvusStore

NOW = 1_750_000_000.0


def ev(user: str, item_id: str, ts: float, event_id: str = "", kind: str = "click") -> InteractionEvent:
    return InteractionEvent(user_id=user, item_id=item_id, kind=kind, timestamp_s=ts, event_id=event_id)


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "store.db")


def _open(db_path: str) -> MilvusStore:
    return MilvusStore(db_path, make_schema())


# --------------------------------------------------------------------------- event ids


def test_a_retried_event_is_stored_once_and_counted_as_a_duplicate(db_path):
    with _open(db_path) as s:
        s.upsert([item(i, np.random.default_rng(0)) for i in ("a", "b", "c")])
        batch = [ev("u", "a", 1.0, "e1"), ev("u", "b", 2.0, "e2"), ev("u", "b", 9.0, "e2")]  # e2 repeated inside
        assert s.record_interactions(batch) == 2
        assert s.record_interactions(batch) == 0  # the retry: nothing new
        assert s.record_interactions([ev("v", "c", 3.0, "e1")]) == 1  # the same id of another user is another event
        assert s.record_interactions([ev("u", "c", 4.0), ev("u", "c", 4.0)]) == 2  # no id: appended as before
        history = s.history("u", 10)
        assert [(e.item_id, e.timestamp_s, e.event_id) for e in history] == [
            ("a", 1.0, "e1"), ("b", 2.0, "e2"), ("c", 4.0, ""), ("c", 4.0, "")]
        assert dict(s.popularity()) == {"a": 1, "b": 1, "c": 3}
    with _open(db_path) as s:  # reopened: the cache is refilled from both collections, dedupe still holds
        assert s.record_interactions([ev("u", "b", 2.0, "e2"), ev("u", "a", 5.0, "e3")]) == 1
        assert [e.item_id for e in s.history("u", 10)] == ["a", "b", "c", "c", "a"]
        assert dict(s.popularity()) == {"a": 2, "b": 1, "c": 3}
        assert sorted((e.user_id, e.event_id) for e in s.interactions() if e.event_id) == [
            ("u", "e1"), ("u", "e2"), ("u", "e3"), ("v", "e1")]


def test_an_event_id_over_the_limit_is_refused_by_edge_and_store(db_path):
    long_id = "\u00e9" * 65  # 130 bytes
    with pytest.raises(InvalidArgument, match=r"interactions\[0\].event_id is 130 bytes"):
        check_interactions([ev("u", "a", NOW, long_id)], LimitsConfig(), now_s=NOW)
    with _open(db_path) as s:
        s.upsert([item("a", np.random.default_rng(0))])
        with pytest.raises(InvalidArgument, match="130 bytes"):
            s.record_interactions([ev("u", "a", 1.0, long_id)])
        assert s.history("u", 10) == []


# --------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize("ts, message", [
    (NOW + 301, r"interactions\[0\].timestamp_s .* is 301 s ahead .* limits.max_future_skew_s = 300 s$"),
    (253_402_300_799.0, "limits.max_future_skew_s = 300 s$"),  # year 9999
    (NOW * 1000, "looks like milliseconds"),
    (5.0, r"before limits.min_timestamp_s = 631152000"),
    (-1.0, "non-negative"),
    (float("nan"), "non-negative"),
    (float("inf"), "non-negative"),
])
def test_timestamps_beyond_the_skew_or_absurdly_old_are_refused(ts, message):
    with pytest.raises(InvalidArgument, match=message):
        check_interactions([ev("u", "a", ts)], LimitsConfig(), now_s=NOW)


def test_timestamps_within_the_limits_pass_and_the_limits_are_configurable():
    limits = LimitsConfig()
    check_interactions([ev("u", "a", 0.0), ev("u", "a", NOW + 299), ev("u", "a", 631_152_000.0)], limits, now_s=NOW)
    check_interactions([ev("u", "a", time.time() + 60)], limits)  # the server's clock by default
    relaxed = LimitsConfig(max_future_skew_s=3600, min_timestamp_s=0)
    check_interactions([ev("u", "a", NOW + 3000), ev("u", "a", 5.0)], relaxed, now_s=NOW)
    with pytest.raises(InvalidArgument, match="max_future_skew_s = 3600 s"):
        check_interactions([ev("u", "a", NOW + 3601)], relaxed, now_s=NOW)


# --------------------------------------------------------------------------- upsert all or nothing


class _Fault(RuntimeError):
    pass


def _fail_items_writes(store: MilvusStore, monkeypatch, times: int | None) -> list[str]:
    """Make ``times`` writes to the items collection raise (None: every one), after the modality vectors
    were written: the fault lands between the two collections' writes. Returns the collections written."""
    real, written = store._conn.write, []
    left = [times]

    def write(collection, rows, row_bytes):
        if collection == store._items and (left[0] is None or left[0] > 0):
            left[0] = None if left[0] is None else left[0] - 1
            raise _Fault("injected between the two writes")
        written.append(collection)
        real(collection, rows, row_bytes)

    monkeypatch.setattr(store._conn, "write", write)
    return written


def _new_version(old, rng):
    new = item(old.item_id, rng, attrs={"genre": "jazz"}, modalities=("text",))
    return new


@pytest.mark.parametrize("backend", ["memory", "milvus"])
def test_an_upsert_cut_between_its_two_writes_is_finished_when_the_store_reopens(db_path, monkeypatch, backend):
    rng = np.random.default_rng(3)
    old = [item(f"i{k}", rng, attrs={"genre": "rock", "year": 1990}) for k in range(3)]
    new = [_new_version(old[0], rng), item("i9", rng, attrs={"genre": "pop"})]
    s = MilvusStore(db_path, make_schema(), search_backend=backend)
    s.upsert(old)
    written = _fail_items_writes(s, monkeypatch, times=None)
    with pytest.raises(_Fault):
        s.upsert(new)
    assert written == [s.mvec_collection, s.mvec_collection]  # the vectors went in, twice; the items rows never
    mixed = s.get(["i0"])["i0"]  # the state a crash here would leave: new modality rows beside the old item row
    assert mixed.attributes == old[0].attributes and set(mixed.modality_vectors) == {"text"}
    monkeypatch.undo()
    s.close()
    with MilvusStore(db_path, make_schema(), search_backend=backend) as s:
        got = s.get(["i0", "i1", "i9"])
        assert_same_item(got["i0"], new[0])
        assert_same_item(got["i9"], new[1])
        assert_same_item(got["i1"], old[1])
        hits = s.search(new[1].fused, 1)
        assert hits[0].item_id == "i9"
        assert not list(s._journal.folder.glob("*.upsert"))


_CRASH = """
import os, sys
import numpy as np
sys.path.insert(0, {support!r})
from milvus_store_support import item, make_schema
from fusionrec.retrieval.milvus import MilvusStore
s = MilvusStore({db!r}, make_schema())
s.upsert([item("a", np.random.default_rng(1), attrs={{"genre": "rock"}})])
real = s._conn.write
def write(collection, rows, row_bytes):
    if collection == s._items and rows[0]["id"] == "a" and len(rows) == 2:
        os._exit(9)  # the process dies between the two collections' writes
    real(collection, rows, row_bytes)
s._conn.write = write
s.upsert([item("a", np.random.default_rng(2), attrs={{"genre": "jazz"}}, modalities=("text",)),
          item("b", np.random.default_rng(3))])
"""


def test_a_process_killed_between_the_two_writes_finds_the_upsert_whole_at_the_next_open(db_path):
    code = _CRASH.format(support=str(Path(__file__).parent), db=db_path)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    with _open(db_path) as s:
        got = s.get(["a", "b"])
        assert_same_item(got["a"], item("a", np.random.default_rng(2), attrs={"genre": "jazz"}, modalities=("text",)))
        assert_same_item(got["b"], item("b", np.random.default_rng(3)))


def test_a_failed_upsert_is_finished_before_the_next_write(db_path, monkeypatch):
    rng = np.random.default_rng(4)
    old = item("a", rng, attrs={"genre": "rock"})
    with _open(db_path) as s:
        s.upsert([old, item("b", rng)])
        _fail_items_writes(s, monkeypatch, times=None)
        new = _new_version(old, rng)
        with pytest.raises(_Fault):
            s.upsert([new])
        monkeypatch.undo()
        assert s.delete(["a"]) == ["a"]  # finishes the upsert first, so the delete is the last word
        assert s.get(["a"]) == {}
        with pytest.raises(_Fault):
            _fail_items_writes(s, monkeypatch, times=None)
            s.upsert([new])
        monkeypatch.undo()
        other = item("c", rng)
        s.upsert([other])
        got = s.get(["a", "c"])
        assert_same_item(got["a"], new)
        assert_same_item(got["c"], other)
        assert s.search(new.fused, 1)[0].item_id == "a"  # the in-memory index followed
    with _open(db_path) as s:  # and nothing is replayed over it at the next open
        assert_same_item(s.get(["a"])["a"], new)


def test_a_transient_failure_between_the_writes_is_rolled_forward_at_once(db_path, monkeypatch):
    rng = np.random.default_rng(5)
    with _open(db_path) as s:
        s.upsert([item("a", rng, attrs={"genre": "rock"})])
        _fail_items_writes(s, monkeypatch, times=1)
        new = _new_version(s.get(["a"])["a"], rng)
        s.upsert([new])  # answered OK: the write completed on the second try
        assert_same_item(s.get(["a"])["a"], new)
        assert not list(s._journal.folder.glob("*.upsert"))


def test_a_journal_left_unreadable_is_dropped_and_the_store_opens(db_path):
    with _open(db_path) as s:
        s.upsert([item("a", np.random.default_rng(6))])
        folder = s._journal.folder
        entry = s._journal.begin(*s._rows.prepare_batch([item("b", np.random.default_rng(7))]))
    whole = entry.path.read_bytes()
    entry.path.write_bytes(whole[:-4])  # cut short inside the vectors
    (folder / "00000000000000000001-000000.upsert").write_bytes(b"cut short")
    with _open(db_path) as s:
        assert set(s.get(["a", "b"])) == {"a"}
        assert not list(folder.glob("*.upsert"))
    entry.path.write_bytes(whole)  # the same journal whole is finished
    with _open(db_path) as s:
        assert_same_item(s.get(["b"])["b"], item("b", np.random.default_rng(7)))
