"""`fusionrec ingest` / `recommend` / `status` and the AsyncClient against the real service: a small
text+image catalog loaded, loaded again (nothing changes), a bad row refused in one line, then found."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fusionrec.cli.main import app
from fusionrec.client import AsyncClient, Client
from fusionrec.core.paths import shared_dir

pytestmark = pytest.mark.integration

#: Ids and an attribute of their own, apart from the sample catalog (and from other tests' items).
ITEMS = {"cli-cat": ("chelsea.png", "a calm photo of a tabby cat on a sofa"),
         "cli-horse": ("horse.png", "an upbeat photo of a horse running in a field"),
         "cli-rocket": ("rocket.jpg", "a dark photo of a rocket launching at night")}


def _catalog(folder: Path) -> Path:
    (folder / "media").mkdir()
    rows = []
    for item_id, (image, text) in ITEMS.items():
        shutil.copy(shared_dir() / "media" / "images" / image, folder / "media" / image)
        rows.append({"id": item_id, "text": text, "image": f"media/{image}",
                     "attributes": {"source": "cli-test", "year": 2001}})
    path = folder / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def _count(service) -> int:
    from ray import serve

    from fusionrec.gateway.runtime import call_handle

    return call_handle(serve.get_deployment_handle("Retrieval", service.app_name), "count", timeout_s=60)


@pytest.fixture
def home(service, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FUSIONREC_HOME", str(tmp_path / "home"))
    yield tmp_path
    with Client(service.target) as client:  # the session catalog is shared: leave it as it was found
        client.delete_items([*ITEMS, "cli-ok", "cli-bad"])


def test_ingest_is_idempotent_refuses_a_bad_row_in_one_line_and_recommend_finds_the_items(service, loaded, home):
    catalog = _catalog(home)
    first = _run("ingest", str(catalog), "-t", service.target, "--batch-size", "2")
    assert first.exit_code == 0 and "upserted 3 items; 0 already stored; 0 bad rows skipped" in first.output
    with Client(service.target) as client:
        assert client.stored_ids(ITEMS) == set(ITEMS)
        assert list(client.get_item("cli-cat").modalities) == ["image", "text"]
    count = _count(service)

    again = _run("ingest", str(catalog), "-t", service.target)
    assert again.exit_code == 0 and "upserted 0 items; 3 already stored" in again.output
    assert _count(service) == count

    bad = home / "bad.jsonl"
    bad.write_text(json.dumps({"id": "cli-ok", "text": "a fine row"}) + "\n"
                   + json.dumps({"id": "cli-bad", "text": "x", "image": "media/nowhere.jpg"}) + "\n")
    refused = _run("ingest", str(bad), "-t", service.target)
    assert refused.exit_code != 0
    assert [line for line in refused.output.splitlines() if "nowhere.jpg" in line] == [
        f"{bad}:2: image: no such file: {home / 'media' / 'nowhere.jpg'}"]
    assert _count(service) == count  # stopped before sending: not even the good row
    skipped = _run("ingest", str(bad), "-t", service.target, "--skip-bad")
    assert skipped.exit_code == 0 and "upserted 1 items; 0 already stored; 1 bad rows skipped" in skipped.output
    assert _count(service) == count + 1

    found = _run("recommend", "-t", service.target, "--text", "a cat on a sofa", "-k", "3", "-f", "source=cli-test",
                 "--json")
    assert found.exit_code == 0, found.output
    ranked = [i["itemId"] for i in json.loads(found.output)["items"]]
    assert ranked[0] == "cli-cat" and set(ranked) == set(ITEMS)
    by_image = _run("recommend", "-t", service.target, "--image", str(home / "media" / "horse.png"), "-k", "1",
                    "-f", "source=cli-test", "-f", "year=2000..2002")
    assert by_image.exit_code == 0 and "  1. cli-horse " in by_image.output, by_image.output
    status = _run("status", "-t", service.target, "--app-name", service.app_name)
    assert status.exit_code == 0 and f"health {service.target}: SERVING" in status.output


def test_async_client_recommends_with_filters_from_python_values(service, loaded, home):
    user = loaded["events"][0]["user_id"]
    image = (home / "q.png")
    shutil.copy(shared_dir() / "media" / "images" / "horse.png", image)

    async def run():
        async with AsyncClient(service.target, deadline_s=30) as client:
            by_user = await client.recommend(user, k=5, filters={"mood": {"calm", "upbeat", "dark"}})
            by_image = await client.recommend(image=image, k=3, filters={"year": (1900, None)})
            return by_user, by_image, await client.serving()

    by_user, by_image, serving = asyncio.run(run())
    assert serving and len(by_user.items) == 5 and "history" in by_user.modalities_used
    assert by_image.items and "image" in by_image.modalities_used
    assert all(i.attributes["year"].number_value >= 1900 for i in by_image.items)
