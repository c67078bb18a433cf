"""Load versioned checkpoints of trained fusion nets (written by fusionrec.fusion.train.export)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

#: 2: weights under ``members`` (one entry per ensemble member; a single net is one member).
FORMAT_VERSION = 2


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], str]:
    """(payload, short sha256 of the file)."""
    blob = Path(path).read_bytes()
    payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if payload.get("format_version") == 1:  # one net, weights at the top level
        payload["members"] = [{k: payload.pop(k, None) for k in ("item_tower", "user_tower", "graph_residual")}]
        payload["format_version"] = FORMAT_VERSION
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {payload.get('format_version')}, expected {FORMAT_VERSION}")
    return payload, hashlib.sha256(blob).hexdigest()[:12]
