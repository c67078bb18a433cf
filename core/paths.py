"""Where fusionrec reads and writes: the working folder, environment variables or the config, never the
location of a source file (an installed wheel lives in site-packages).

| what | default (relative to the working folder) | environment variable |
|---|---|---|
| working state: demo catalog, checkpoints, caches | `.fusionrec/` | `FUSIONREC_HOME` |
| real data and sample media (read in place) | `../shared/` | `FUSIONREC_SHARED_DIR` |
| benchmark results | `bench/results/` | `FUSIONREC_RESULTS_DIR` |
| quality reports | `reports/quality/` | `FUSIONREC_REPORTS_DIR` |
| Serve config of `fusionrec serve` / `demo` | the packaged `deploy/local.yaml` | `FUSIONREC_CONFIG` |
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_VAR = "FUSIONREC_SHARED_DIR"


class PathSettings(BaseSettings):
    """Path knobs, read from ``FUSIONREC_*`` environment variables at each call (tests change them)."""

    model_config = SettingsConfigDict(env_prefix="FUSIONREC_", extra="ignore")

    home: Path = Field(Path(".fusionrec"), description="Working state: demo catalog, checkpoints, caches.")
    shared_dir: Path = Field(Path("../shared"), description="Real data (data/) and sample media (media/), read in place.")
    results_dir: Path = Field(Path("bench/results"), description="Where benchmarks write JSON and PNG results.")
    reports_dir: Path = Field(Path("reports/quality"), description="Where quality evaluations write their reports.")
    config: Path | None = Field(None, description="Serve config file; None = the packaged deploy/local.yaml.")


def settings() -> PathSettings:
    return PathSettings()


def home(*parts: str) -> Path:
    """``$FUSIONREC_HOME/parts...`` (default ``.fusionrec/`` in the working folder)."""
    return settings().home.joinpath(*parts)


def demo_dir() -> Path:
    """Where ``fusionrec demo`` writes its sample catalog."""
    return home("demo")


def shared_dir() -> Path:
    """The shared root: ``$FUSIONREC_SHARED_DIR`` when set, else ``../shared`` from the working folder."""
    return settings().shared_dir


def shared_path(*parts: str) -> Path:
    """``shared_dir()/parts...``, or FileNotFoundError that says where it looked and how to point elsewhere."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        where = (f"{ENV_VAR}={shared_dir()}" if os.environ.get(ENV_VAR)
                 else f"{shared_dir().resolve()}, ../shared from the working folder")
        raise FileNotFoundError(f"{path} is missing: fusionrec reads its data and sample media from {where}; "
                                f"run from a checkout beside it or set {ENV_VAR} to where it is")
    return path


def results_dir() -> Path:
    return settings().results_dir


def reports_dir() -> Path:
    return settings().reports_dir


def packaged_config(name: str = "local.yaml") -> Path:
    """A Serve config shipped in the package (``deploy/<name>``)."""
    return Path(str(resources.files("fusionrec.deploy").joinpath(name)))


def default_config() -> Path:
    """``$FUSIONREC_CONFIG``, else the packaged ``deploy/local.yaml``."""
    return settings().config or packaged_config()
