"""Where fusionrec reads and writes: the working folder and FUSIONREC_* variables, never a source file's location."""

from __future__ import annotations

import pytest

from fusionrec.fusion.train.data import load_dataset
from fusionrec.core import paths
from fusionrec.core.paths import ENV_VAR, shared_dir, shared_path


def test_defaults_follow_the_working_folder(monkeypatch, tmp_path):
    for var in (ENV_VAR, "FUSIONREC_HOME", "FUSIONREC_RESULTS_DIR", "FUSIONREC_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert shared_dir().resolve() == tmp_path.parent / "shared"
    assert paths.home("checkpoints").resolve() == tmp_path / ".fusionrec" / "checkpoints"
    assert paths.results_dir().resolve() == tmp_path / "bench" / "results"
    assert paths.default_config().name == "local.yaml" and paths.default_config().is_file()


def test_env_vars_point_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSIONREC_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("FUSIONREC_CONFIG", str(tmp_path / "my.yaml"))
    assert paths.demo_dir() == tmp_path / "state" / "demo"
    assert paths.default_config() == tmp_path / "my.yaml"


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
