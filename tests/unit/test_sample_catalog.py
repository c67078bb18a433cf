"""The demo catalog generator: deterministic, complete, and carrying shared signal across modalities."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from fusionrec.core.paths import shared_dir
from fusionrec.cli.sample_catalog import CATEGORIES, MOODS, SAMPLE_RATE, generate_catalog

MEDIA_DIR = shared_dir() / "media"
N_ITEMS, N_USERS = 24, 5

pytestmark = pytest.mark.skipif(not (MEDIA_DIR / "images").is_dir(), reason=f"sample media missing: {MEDIA_DIR}")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    steps: list[int] = []
    files = generate_catalog(tmp_path_factory.mktemp("catalog"), MEDIA_DIR, n_items=N_ITEMS, n_users=N_USERS,
                             progress=steps.append)
    return files, steps


@pytest.fixture(scope="module")
def items(catalog):
    return _rows(catalog[0].catalog_path)


@pytest.fixture(scope="module")
def interactions(catalog):
    return _rows(catalog[0].interactions_path)


def test_files_and_progress(catalog):
    files, steps = catalog
    out = files.catalog_path.parent
    assert files.catalog_path == out / "catalog.jsonl" and files.interactions_path == out / "interactions.jsonl"
    assert (files.n_items, files.n_users) == (N_ITEMS, N_USERS)
    assert steps == [1] * N_ITEMS
    assert (out / "README.txt").read_text().startswith("fusionrec sample catalog")
    assert json.loads((out / "manifest.json").read_text())["seed"] == 7


def test_same_arguments_give_identical_bytes(catalog, tmp_path):
    first = catalog[0].catalog_path.parent
    generate_catalog(tmp_path, MEDIA_DIR, n_items=N_ITEMS, n_users=N_USERS)
    names = ["catalog.jsonl", "interactions.jsonl", "README.txt", "manifest.json",
             "media/item-0001.jpg", "media/item-0001.wav", f"media/item-{N_ITEMS:04d}.jpg", f"media/item-{N_ITEMS:04d}.wav"]
    for name in names:
        assert (first / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_rerun_reuses_files_and_other_seed_regenerates(tmp_path):
    files = generate_catalog(tmp_path, MEDIA_DIR, n_items=8, n_users=2)
    before = files.catalog_path.stat().st_mtime_ns
    steps: list[int] = []
    generate_catalog(tmp_path, MEDIA_DIR, n_items=8, n_users=2, progress=steps.append)
    assert files.catalog_path.stat().st_mtime_ns == before and steps == [8]
    old = files.catalog_path.read_bytes()
    generate_catalog(tmp_path, MEDIA_DIR, n_items=8, n_users=2, seed=8)
    assert files.catalog_path.read_bytes() != old
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 8


def test_missing_photo_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        generate_catalog(tmp_path / "out", tmp_path, n_items=2, n_users=1)


def test_every_item_has_three_decodable_modalities(catalog, items):
    base = catalog[0].catalog_path.parent
    assert [r["id"] for r in items] == [f"item-{i:04d}" for i in range(1, N_ITEMS + 1)]
    for row in items:
        assert set(row) == {"id", "attributes", "text", "image", "audio"}
        assert row["image"] == f"media/{row['id']}.jpg" and row["audio"] == f"media/{row['id']}.wav"
        with Image.open(base / row["image"]) as img:
            img.load()
            assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= 320 and min(img.size) > 50
        audio, rate = sf.read(base / row["audio"])
        info = sf.info(base / row["audio"])
        assert rate == SAMPLE_RATE == 22050 and info.channels == 1 and info.subtype == "PCM_16"
        assert len(audio) == int(2.0 * SAMPLE_RATE) and 0.1 < np.abs(audio).max() <= 1.0


def test_attributes_and_text(items):
    for row in items:
        a = row["attributes"]
        assert set(a) == {"category", "mood", "year", "price", "explicit"}
        assert a["category"] in CATEGORIES and a["mood"] in MOODS
        assert type(a["year"]) is int and 1990 <= a["year"] <= 2025
        assert type(a["price"]) is float and a["price"] > 0
        assert type(a["explicit"]) is bool
        assert isinstance(row["text"], str) and row["text"].endswith(".") and len(row["text"].split()) >= 6
    counts = Counter(r["attributes"]["category"] for r in items)
    assert set(counts) == set(CATEGORIES) and max(counts.values()) - min(counts.values()) <= 1
    by_cat = defaultdict(list)
    for row in items:
        by_cat[row["attributes"]["category"]].append(row["text"])
    assert all(len(set(texts)) == len(texts) for texts in by_cat.values())  # varied wording within a category


def test_interactions_reference_items_in_time_order(items, interactions):
    ids = {r["id"] for r in items}
    per_user = defaultdict(list)
    for row in interactions:
        assert set(row) == {"user_id", "item_id", "kind", "timestamp_s"}
        assert row["item_id"] in ids and row["kind"] in {"view", "like", "play"}
        assert isinstance(row["timestamp_s"], float)
        per_user[row["user_id"]].append(row["timestamp_s"])
    assert sorted(per_user) == [f"user-{u:03d}" for u in range(1, N_USERS + 1)]
    for stamps in per_user.values():
        assert 8 <= len(stamps) <= 20 and all(a < b for a, b in zip(stamps, stamps[1:]))


def test_histories_are_dominated_by_preferred_categories(items, interactions):
    category = {r["id"]: r["attributes"]["category"] for r in items}
    per_user = defaultdict(Counter)
    for row in interactions:
        per_user[row["user_id"]][category[row["item_id"]]] += 1
    top2 = [sum(n for _, n in c.most_common(2)) / sum(c.values()) for c in per_user.values()]
    assert min(top2) >= 0.5 and np.mean(top2) >= 0.75  # users prefer 1-2 categories, ~85 % of events


def test_audio_is_more_alike_within_category(catalog, items):
    librosa = pytest.importorskip("librosa")
    base = catalog[0].catalog_path.parent
    feats = []
    for row in items:
        y, sr = sf.read(base / row["audio"], dtype="float32")
        feats.append(librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr, n_mels=64)).mean(axis=1))
    x = np.asarray(feats)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    cats = np.array([r["attributes"]["category"] for r in items])
    same = cats[:, None] == cats[None, :]
    off_diag = ~np.eye(len(items), dtype=bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.05
