"""Where data and media are read from: $FUSIONREC_SHARED_DIR overrides ../shared, and a miss says how to fix it."""

from __future__ import annotations

import pytest

from fusion.data import load_dataset
from fusion.shared import BESIDE_CHECKOUT, ENV_VAR, shared_dir, shared_path


def test_default_is_beside_the_checkout(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert shared_dir() == BESIDE_CHECKOUT


def test_env_var_points_elsewhere(monkeypatch, tmp_path):
    (tmp_path / "media").mkdir()
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert shared_path("media") == tmp_path / "media"


def test_missing_root_names_the_path_and_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"nowhere/media is missing.*set {ENV_VAR}"):
        shared_path("media")
    with pytest.raises(FileNotFoundError, match=f"nowhere/data/lfm2k is missing.*{ENV_VAR}"):
        load_dataset("lfm2k")
