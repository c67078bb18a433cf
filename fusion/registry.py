"""Fusion models by registry name; unknown names fail loudly."""

from __future__ import annotations

import importlib
from typing import Any

from fusionrec.fusion.base import FusionModel

FUSION_MODELS: dict[str, str] = {
    "weighted-v0": "fusionrec.fusion.weighted:WeightedBlockFusion",
    "trained": "fusionrec.fusion.trained:TrainedFusion",
}


def get_fusion_model(name: str, modality_dims: dict[str, int], **options: Any) -> FusionModel:
    """Instantiate the fusion model registered under ``name``."""
    try:
        target = FUSION_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown fusion model {name!r}; known: {sorted(FUSION_MODELS)}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(modality_dims, **options)
