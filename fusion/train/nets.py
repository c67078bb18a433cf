"""Trainable nets by name (``VariantConfig.kind``); unknown names fail loudly."""

from __future__ import annotations

import numpy as np
from torch import nn

from fusionrec.fusion.train.config import TrainConfig, VariantConfig
from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.fusion_net import FusionNet
from fusionrec.fusion.train.lightgcn import LightGCNNet

#: Every net is built by ``<Net>.from_data(variant, data, cfg, known_items)`` and exposes
#: ``scores(users, hist, hist_mask) -> (b, n_items)``, so one training loop and one evaluator serve them all.
NETS: dict[str, type[nn.Module]] = {"fusion": FusionNet, "lightgcn": LightGCNNet}


def build_net(variant: VariantConfig, data: InteractionData, cfg: TrainConfig,
              known_items: np.ndarray | None = None) -> nn.Module:
    """Instantiate ``variant`` on ``data`` (graphs built from its train split only).

    Args:
        known_items: (k,) item ids allowed an id embedding (default: every item in ``data.train``).
    Raises:
        ValueError: ``variant.kind`` names no net.
    """
    try:
        net = NETS[variant.kind]
    except KeyError:
        raise ValueError(f"unknown net kind {variant.kind!r}; known: {sorted(NETS)}") from None
    return net.from_data(variant, data, cfg, known_items)
