"""LightGCN baseline: per-user and per-item embeddings smoothed over the sparse user-item graph (evaluated, never
served)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fusionrec.fusion.train.config import TrainConfig, VariantConfig
from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.graph import bipartite_graph, to_torch


class LightGCNNet(nn.Module):
    """LightGCN baseline (per-user embeddings; evaluated, never served)."""

    uses_history = False

    def __init__(self, n_users: int, n_items: int, adj: torch.Tensor, cfg: TrainConfig, layers: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_users, self.n_items, self.adj, self.layers = n_users, n_items, adj, layers
        self.emb = nn.Embedding(n_users + n_items, cfg.block_dim)
        nn.init.normal_(self.emb.weight, std=0.1)

    @classmethod
    def from_data(cls, variant: VariantConfig, data: InteractionData, cfg: TrainConfig,
                  known_items: np.ndarray | None = None) -> "LightGCNNet":
        """LightGCN over the user-item graph of ``data.train`` (``variant`` and ``known_items`` unused)."""
        adj = bipartite_graph(data.train, data.n_users, data.n_items)
        return cls(data.n_users, data.n_items, to_torch(adj), cfg)

    def propagated(self) -> torch.Tensor:
        """(n_users + n_items, block_dim) embeddings averaged over ``layers`` graph hops (users first)."""
        x, out = self.emb.weight, self.emb.weight
        for _ in range(self.layers):
            x = torch.sparse.mm(self.adj, x)
            out = out + x
        return out / (self.layers + 1)

    def scores(self, users: torch.Tensor, hist: torch.Tensor, hist_mask: torch.Tensor,
               items: torch.Tensor | None = None, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """(b,) users -> (b, n_items) scores, or (b, c) for the item ids ``candidates`` (history and ``items``
        unused: users have their own embeddings)."""
        emb = self.propagated()
        if self.cfg.normalize:
            emb = nn.functional.normalize(emb, dim=-1)
        item_rows = emb[self.n_users:] if candidates is None else emb[self.n_users + candidates]
        return emb[users] @ item_rows.T / self.cfg.temperature
