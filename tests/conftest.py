"""Shared fixtures: where the real sample media and data live (../shared beside the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def media_dir() -> Path:
    return SHARED / "media"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return SHARED / "data"
