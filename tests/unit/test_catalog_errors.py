"""Bad catalog rows are reported as one line naming file:line, the field and the problem; `fusionrec ingest`
stops before sending (or skips with --skip-bad), never shows a traceback, and reruns resume. The ingest runs
here go to an in-memory Recommender over real gRPC; tests/integration/test_client_cli.py runs it against the
real service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fusionrec.cli.catalog import (CatalogError, catalog_batches, read_catalog, read_interactions, read_jsonl,
                                   row_to_pb)
from fusionrec.cli.main import app

from recommender_double_support import InMemoryRecommender, serving


def _write(folder: Path, name: str, lines: list) -> Path:
    path = folder / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def media(tmp_path) -> Path:
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.jpg").write_bytes(b"\xff\xd8not really a jpeg")
    return tmp_path / "media"


def _errors(path: Path) -> list[str]:
    return [str(r) for r in read_catalog(path) if isinstance(r, CatalogError)]


def test_a_missing_image_names_file_line_field_and_path(tmp_path, media):
    path = _write(tmp_path, "catalog.jsonl", [{"id": "a", "image": "media/a.jpg"},
                                              {"id": "b", "text": "b", "image": "media/gone.jpg"}])
    assert _errors(path) == [f"{path}:2: image: no such file: {tmp_path / 'media' / 'gone.jpg'}"]


def test_a_bad_json_line_is_reported_and_the_next_lines_still_read(tmp_path):
    path = _write(tmp_path, "catalog.jsonl", [{"id": "a", "text": "a"}, '{"id": "b", "text": "b"', "",
                                              '["not", "an", "object"]', {"id": "c", "text": "c"}])
    assert _errors(path) == [f"{path}:2: line: not valid JSON (Expecting ',' delimiter at column 24)",
                             f"{path}:4: line: a JSON object is expected, got list"]
    assert [r.item_id for r in read_catalog(path) if not isinstance(r, CatalogError)] == ["a", "c"]
    with pytest.raises(ValueError, match=r"catalog.jsonl:2: line: not valid JSON"):
        list(read_jsonl(path))


@pytest.mark.parametrize("row, report", [
    ({"id": "a", "text": 5}, "text: a string is expected, got int"),
    ({"id": True, "text": "x"}, "id: id must be a string, got bool"),
    ({"text": "x"}, "id: missing"),
    ({"id": "a", "text": "x", "attributes": [1]}, "attributes: an object (name -> value) is expected, got list"),
    ({"id": "a", "text": "x", "attributes": {"year": [2001]}}, "attributes: attribute 'year': value must be str, "
                                                               "number or bool, got list"),
    ({"id": "a", "image": 3}, "image: a file path (string) is expected, got int"),
    ({"id": "a", "audio": "media"}, "audio: not a file: {dir}/media"),
    ({"id": "a", "vectors": {"text": [1, "x"]}}, "vectors: every value must be a finite number"),
    ({"id": "a", "vectors": [1.0]}, "vectors: an object (modality -> values) is expected, got list"),
    ({"id": "a", "titel": "typo"}, "titel: unknown field (known: id, attributes, text, image, audio, vectors)"),
    ({"id": "a", "attributes": {"year": 1}}, "text: the item has no text, image, audio or vectors"),
])
def test_wrong_types_and_fields_name_the_field(tmp_path, media, row, report):
    path = _write(tmp_path, "catalog.jsonl", [row])
    assert _errors(path) == [f"{path}:1: " + report.format(dir=tmp_path)]


def test_a_repeated_id_names_the_first_line(tmp_path):
    path = _write(tmp_path, "catalog.jsonl", [{"id": 7, "text": "a"}, {"id": "7", "text": "b"}])
    assert _errors(path) == [f"{path}:2: id: '7' is already on line 1"]


def test_a_file_that_disappears_after_the_check_is_that_rows_error(tmp_path, media):
    path = _write(tmp_path, "catalog.jsonl", [{"id": "a", "image": "media/a.jpg", "attributes": {"y": 1}}])
    (row,) = read_catalog(path)
    assert row_to_pb(row).content.image.startswith(b"\xff\xd8")
    (media / "a.jpg").unlink()
    with pytest.raises(CatalogError, match=r"catalog.jsonl:1: image: cannot read .*a.jpg: No such file"):
        row_to_pb(row)
    with pytest.raises(CatalogError):
        list(catalog_batches(path, 8))


def test_interaction_rows_are_checked_too(tmp_path):
    path = _write(tmp_path, "interactions.jsonl", [{"user_id": "u", "item_id": 3, "kind": "like"},
                                                   {"user_id": "u"}, {"user_id": "u", "item_id": "i", "timestamp_s": -1},
                                                   "{oops"])
    out = [str(r) if isinstance(r, CatalogError) else (r.user_id, r.item_id, r.kind) for r in read_interactions(path)]
    assert out == [("u", "3", "like"), f"{path}:2: item_id: missing",
                   f"{path}:3: timestamp_s: a non-negative number of seconds is expected, got -1",
                   f"{path}:4: line: not valid JSON (Expecting property name enclosed in double quotes at column 2)"]


# ---------- `fusionrec ingest` ----------

def _ingest(*args: str):
    return CliRunner().invoke(app, ["ingest", *args])


def test_ingest_stops_before_sending_anything_on_a_bad_row(tmp_path, media):
    path = _write(tmp_path, "catalog.jsonl", [{"id": "a", "text": "a"}, {"id": "b", "image": "media/gone.jpg"}])
    service = InMemoryRecommender()
    with serving(service) as target:
        result = _ingest(str(path), "-t", target)
    assert result.exit_code == 1 and "Traceback" not in result.output and result.exception.__class__ is SystemExit
    bad_lines = [line for line in result.output.splitlines() if "gone.jpg" in line]
    assert bad_lines == [f"{path}:2: image: no such file: {media / 'gone.jpg'}"]
    assert "nothing was sent" in result.output and not service.items and not service.attempts


def test_ingest_skip_bad_loads_the_rest_counts_the_bad_and_a_rerun_resumes(tmp_path, media, monkeypatch):
    monkeypatch.setenv("FUSIONREC_HOME", str(tmp_path / "home"))
    path = _write(tmp_path, "catalog.jsonl", [
        {"id": "a", "text": "a", "image": "media/a.jpg", "attributes": {"year": 2001}}, "{bad json",
        {"id": "b", "text": "reject me"}, {"id": "c", "text": "c"}, {"id": "d", "text": 4}, {"id": "e", "text": "e"}])
    events = _write(tmp_path, "interactions.jsonl", [{"user_id": "u", "item_id": "a"}, {"user_id": "u", "item_id": "c"}])
    service = InMemoryRecommender()
    with serving(service) as target:
        first = _ingest(str(path), "--interactions", str(events), "-t", target, "--skip-bad", "--batch-size", "4")
        assert first.exit_code == 0, first.output
        assert sorted(service.items) == ["a", "c", "e"] and len(service.events) == 2
        # The service refused b's batch (all or nothing): splitting it found b, on line 3.
        assert f"{path}:3: id: 'b' rejected by the service: items[0] ('b'): cannot encode" in first.output
        assert "upserted 3 items; 0 already stored; 3 bad rows skipped" in first.output
        assert "recorded 2 interactions; 0 already recorded" in first.output
        again = _ingest(str(path), "--interactions", str(events), "-t", target, "--skip-bad")
        assert "upserted 0 items; 3 already stored" in again.output, again.output
        assert "recorded 0 interactions; 2 already recorded" in again.output and len(service.events) == 2
        calls = len(service.upsert_calls)
        forced = _ingest(str(path), "-t", target, "--skip-bad", "--no-resume")
        assert "upserted 3 items; 0 already stored" in forced.output and len(service.upsert_calls) > calls
    assert "Traceback" not in first.output + again.output + forced.output


def test_ingest_without_skip_bad_stops_at_a_row_the_service_rejects(tmp_path):
    path = _write(tmp_path, "catalog.jsonl", [{"id": "a", "text": "a"}, {"id": "b", "text": "reject me"},
                                              {"id": "c", "text": "c"}])
    service = InMemoryRecommender()
    with serving(service) as target:
        result = _ingest(str(path), "-t", target)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{path}:2: id: 'b' rejected by the service" in result.output
    assert "c" not in service.items


def test_ingest_against_no_service_is_one_error_line(tmp_path):
    path = _write(tmp_path, "catalog.jsonl", [{"id": "a", "text": "a"}])
    with serving(InMemoryRecommender()) as target:
        pass  # the port is free again: nothing listens there
    result = _ingest(str(path), "-t", target)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")][0].startswith(
        "error: GetItem: UNAVAILABLE")
