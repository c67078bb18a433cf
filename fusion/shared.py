"""Where the real data and sample media live: $FUSIONREC_SHARED_DIR, else ../shared beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "FUSIONREC_SHARED_DIR"
#: The checkout's sibling: data is read in place there, never copied into the repo (research-only terms).
BESIDE_CHECKOUT = Path(__file__).resolve().parents[2] / "shared"


def shared_dir() -> Path:
    """The shared root: ``$FUSIONREC_SHARED_DIR`` when set, else ``../shared`` beside the checkout."""
    return Path(os.environ.get(ENV_VAR) or BESIDE_CHECKOUT)


def shared_path(*parts: str) -> Path:
    """``shared_dir()/parts...``, or FileNotFoundError that says where it looked and how to point elsewhere."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        where = (f"{ENV_VAR}={shared_dir()}" if os.environ.get(ENV_VAR)
                 else f"{shared_dir()}, ../shared beside the checkout")
        raise FileNotFoundError(f"{path} is missing: fusionrec reads its data and sample media from {where}; "
                                f"clone beside it or set {ENV_VAR} to where it is")
    return path
