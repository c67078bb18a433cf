"""Shared fixtures: where the real sample media and data live (../shared beside the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusionrec.core.paths import shared_dir

SHARED = shared_dir()


@pytest.fixture(scope="session")
def media_dir() -> Path:
    return SHARED / "media"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return SHARED / "data"
