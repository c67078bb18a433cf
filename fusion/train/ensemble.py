"""A deep ensemble of fusion nets served as one two-tower model: concatenated unit vectors score the mean cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from fusionrec.fusion.train.fusion_net import FusionNet


def member_seed(seed: int, member: int, members: int) -> int:
    """Seed of member ``member`` of the ensemble trained under ``seed`` (disjoint across ensembles)."""
    return seed * members + member


class EnsembleNet(nn.Module):
    """K fusion nets trained independently (different seeds), scored as the mean of their cosines.

    Item vectors are the members' unit item vectors concatenated and scaled by 1/sqrt(K): unit
    rows of size K * member_dim. A user vector built the same way from the members' unit user
    vectors gives ``user @ item = mean_k cos_k``, so one inner-product search ranks by the ensemble.

    Args:
        members: trained FusionNets over the same data and config, each with ``cfg.normalize``.
    Raises:
        ValueError: no members, or a member scores raw inner products (norms would not combine).
    """

    def __init__(self, members: list[FusionNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if not all(m.cfg.normalize for m in members):
            raise ValueError("ensemble members must be trained with normalize=True (cosine scores)")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg
        self.n_items = members[0].n_items
        self.member_dim = members[0].item_tower.dim

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(len(self.members))

    def item_vectors(self, train: bool = False) -> tuple[torch.Tensor, None]:
        """(n_items, K * member_dim) unit rows, as served; no blocks (align loss is per member)."""
        return torch.cat([m.item_vectors(train)[0] for m in self.members], dim=1) * self.scale, None

    def split(self, vectors: torch.Tensor) -> list[torch.Tensor]:
        """(n, K * member_dim) ensemble vectors -> K (n, member_dim) member vectors (unit again)."""
        return [part / self.scale for part in vectors.split(self.member_dim, dim=-1)]

    def scores(self, users: torch.Tensor, hist: torch.Tensor, hist_mask: torch.Tensor,
               items: torch.Tensor | None = None) -> torch.Tensor:
        """(b,) users, (b, h) history ids, (b, h) mask -> (b, n_items) mean of the members' scores."""
        if items is None:
            items, _ = self.item_vectors(train=False)
        parts = self.split(items)
        return sum(m.scores(users, hist, hist_mask, p) for m, p in zip(self.members, parts)) / len(self.members)
