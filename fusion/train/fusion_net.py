"""The two-tower fusion net (id/content/full/graph variants): ItemTower + sparse graph smoothing, UserTower.

A training batch scores either every item (``batch_items(None)``: exact softmax, exact graph gradients) or a
sample of them (``batch_items(ids)``, fusionrec.fusion.train.sampling): then only the sampled items go through
the item tower and the graph's contribution is the residual of the last ``refresh`` (no gradient), which is
how a served checkpoint applies it too (fusionrec.fusion.trained), so a batch costs O(sample), not O(catalog).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from fusionrec.fusion.cold import ColdStart, centred_units
from fusionrec.fusion.towers import ItemTower, build_user_tower
from fusionrec.fusion.train.config import TrainConfig, VariantConfig, variant_modalities
from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.graph import content_knn_graph, cooccurrence_graph, to_torch


#: Items per item-tower call when no gradient is kept (refresh, evaluation, export).
NO_GRAD_CHUNK_ITEMS = 8192


class FusionNet(nn.Module):
    """Two-tower net: ItemTower over all items (+ frozen-able graph smoothing), UserTower over history.

    Args:
        features: modality -> (n_items, d_m) float32 tensors (raw encoder vectors).
        known: (n_items,) bool, items that may use an id embedding (seen in training).
        graph: (n_items, n_items) normalised item-item operator (torch sparse CSR) or None.
        cold: how items outside ``known`` borrow from warm ones (keys over the ``known`` rows), or None.
        catalog: (n_items,) bool, items in the catalog while training (default all): the others are
            held out entirely (no negative, no alignment sample).
        present: modality -> (n_items,) bool, items that have it (default all); absent ones are masked
            as serving masks them.
    """

    def __init__(self, features: dict[str, torch.Tensor], n_items: int, use_id: bool, known: torch.Tensor,
                 graph: torch.Tensor | None, cfg: TrainConfig, cold: ColdStart | None = None,
                 catalog: torch.Tensor | None = None, present: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.features = features
        self.n_items = n_items
        self.known = known
        self.catalog = torch.ones(n_items, dtype=torch.bool) if catalog is None else catalog
        self.graph = graph
        self.present = {m: (present or {}).get(m, torch.ones(n_items, dtype=torch.bool)) for m in features}
        self.cold = cold if cfg.normalize else None  # borrowing mixes unit vectors
        self._warm_rows = known.nonzero().squeeze(1)
        self._cold_rows = (~known).nonzero().squeeze(1)
        # Features never change: find the cold items' warm neighbours once, not on every forward pass.
        self._cold_match = None if self.cold is None or not len(self._cold_rows) else self.cold.match(
            {m: features[m][self._cold_rows].numpy() for m in self.cold.modalities})
        self._cold_slot = torch.full((n_items,), -1, dtype=torch.long)  # item -> its row in _cold_match
        self._cold_slot[self._cold_rows] = torch.arange(len(self._cold_rows))
        #: From ``refresh``: (graph residual (n_items, dim) or None, warm items' served vectors (w, dim)).
        self._stale: tuple[torch.Tensor | None, torch.Tensor] | None = None
        #: Seconds spent building the item graph and fitting/matching cold start (set by ``from_data``).
        self.build_timings: dict[str, float] = {}
        means = {m: x[known].mean(0) if known.any() else x.mean(0) for m, x in features.items()}
        self.item_tower = ItemTower({m: x.shape[1] for m, x in features.items()}, n_items if use_id else 0,
                                    cfg.block_dim, means, hidden=cfg.hidden)
        self.user_tower = build_user_tower(cfg.user_tower, self.item_tower.dim)

    @classmethod
    def from_data(cls, variant: VariantConfig, data: InteractionData, cfg: TrainConfig,
                  known_items: np.ndarray | None = None) -> "FusionNet":
        """The net of ``variant`` on ``data``: its modalities, graph and cold-start keys built from the train split.

        Args:
            known_items: (k,) item ids allowed an id embedding (default: every item in ``data.train``).
        """
        mods = variant_modalities(variant, data.modality_dims())
        feats = {m: torch.as_tensor(data.features[m], dtype=torch.float32) for m in mods}
        known = torch.zeros(data.n_items, dtype=torch.bool)
        known[torch.as_tensor(np.unique(data.train[:, 1]) if known_items is None else known_items)] = True
        catalog = torch.ones(data.n_items, dtype=torch.bool)
        if data.held_out is not None:
            catalog[torch.as_tensor(data.held_out)] = False
        # Content neighbours (graph edges, cold-start borrowing) come from the variant's own content:
        # text when it has it (tags are the cleanest), else all of it. An ablation never sees a modality it
        # does not use, not even through neighbours.
        neighbour_mods = ["text"] if "text" in mods else list(mods)
        cold = None
        t0 = time.perf_counter()
        if variant.use_id and mods and cfg.cold_share > 0:
            cold = ColdStart.fit(data.features, known.numpy(), tuple(neighbour_mods), cfg.cold_k, cfg.cold_share)
        t1 = time.perf_counter()
        graph = _item_graph(data, cfg, neighbour_mods, known, catalog) if variant.graph else None
        t2 = time.perf_counter()
        present = {m: torch.as_tensor(data.present[m], dtype=torch.bool) for m in mods if m in data.present}
        net = cls(feats, data.n_items, variant.use_id, known, graph, cfg, cold, catalog, present)  # matches cold items
        net.build_timings = {"graph_s": t2 - t1, "cold_start_s": (t1 - t0) + (time.perf_counter() - t2)}
        return net

    def item_blocks(self, train: bool, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(c, P, block_dim) blocks of the items ``ids`` (default every item), with modality/id dropout when
        training."""
        n = self.n_items if ids is None else len(ids)
        present = {m: (self.present[m] if ids is None else self.present[m][ids]).clone() for m in self.features}
        id_present = (self.known if ids is None else self.known[ids]).clone()
        if train and self.cfg.modality_dropout > 0 and len(self.features) > 1:
            for m in present:
                present[m] &= torch.rand(n) >= self.cfg.modality_dropout
        if train and self.cfg.id_dropout > 0 and self.features:
            id_present &= torch.rand(n) >= self.cfg.id_dropout
        if self.features:  # never drop everything: restore the item's first content modality
            nothing = ~torch.stack(list(present.values()), 1).any(1)
            for m in present:
                restore = nothing & (self.present[m] if ids is None else self.present[m][ids])
                present[m] = present[m] | restore
                nothing = nothing & ~restore
        if ids is None and (train or torch.is_grad_enabled() or n <= NO_GRAD_CHUNK_ITEMS):
            return self.item_tower(self.features, present, torch.arange(n), id_present)
        idx = torch.arange(n) if ids is None else ids
        # Without gradients a large catalog goes through in chunks: the towers' (n, d_m) temporaries of a
        # 100k-item catalog would otherwise take ~1 GiB at once.
        step = max(1, n if torch.is_grad_enabled() else NO_GRAD_CHUNK_ITEMS)
        return torch.cat([self.item_tower({m: x[idx[a:a + step]] for m, x in self.features.items()},
                                          {m: p[a:a + step] for m, p in present.items()}, idx[a:a + step],
                                          id_present[a:a + step]) for a in range(0, max(n, 1), step)])

    def propagate(self, blocks: torch.Tensor) -> torch.Tensor:
        """Graph smoothing per block (linear, so the block layout survives): x + sum_l alpha^l S^l x."""
        if self.graph is None:
            return blocks
        n, p, d = blocks.shape
        x = blocks.reshape(n, p * d)
        out, h = x, x
        for layer in range(1, self.cfg.graph_layers + 1):
            h = torch.sparse.mm(self.graph, h)
            out = out + (self.cfg.graph_alpha ** layer) * h
        return out.reshape(n, p, d)

    def _served(self, flat: torch.Tensor, ids: torch.Tensor | None, warm: torch.Tensor | None = None) -> torch.Tensor:
        """(c, dim) propagated vectors of ``ids`` (default all) -> as served: unit rows, cold items blended with
        their warm neighbours' vectors (``warm``: every warm item's served vector; default ``flat``'s own)."""
        if self.cfg.normalize:
            flat = nn.functional.normalize(flat, dim=-1)
        if self._cold_match is None:
            return flat
        if ids is None:
            rows, slots = self._cold_rows, torch.arange(len(self._cold_rows))
        else:
            slots = self._cold_slot[ids]
            rows = (slots >= 0).nonzero().squeeze(1)
            slots = slots[rows]
        if not len(rows):
            return flat
        # Detached: an unchosen item pushed down as a negative must not drag its neighbours with it.
        warm = flat[self._warm_rows].detach() if warm is None else warm
        idx, w = self._cold_match
        borrowed = self.cold.blend(flat[rows], (idx[slots.numpy()], w[slots.numpy()]), warm)
        return flat.index_copy(0, rows, borrowed)

    def item_vectors(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused item vectors as served, (n_items, dim), and their (n_items, P, block_dim) blocks."""
        blocks = self.propagate(self.item_blocks(train))
        return self._served(blocks.reshape(self.n_items, -1), None), blocks

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute, without dropout, every item's graph residual (propagated - own blocks) and the warm
        items' served vectors, for ``batch_items`` over a sample (once per epoch: O(catalog), not per batch)."""
        was_training = self.training
        self.eval()  # no feature dropout either: the residual stands for the served graph term
        own = self.item_blocks(train=False)
        prop = self.propagate(own)
        residual = None if self.graph is None else (prop - own).reshape(self.n_items, -1)
        warm = self._served(prop.reshape(self.n_items, -1), None)[self._warm_rows]
        self._stale = (residual, warm)
        self.train(was_training)

    def batch_items(self, ids: torch.Tensor | None, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors and blocks a training batch scores: every item (``ids`` None, exact) or the items ``ids``:
        fresh own blocks + the graph residual of the last ``refresh`` (computed on first use).

        Returns:
            (c, dim) item vectors as served and their (c, P, block_dim) blocks, rows in ``ids`` order.
        """
        if ids is None:
            return self.item_vectors(train)
        if self._stale is None:
            self.refresh()
        residual, warm = self._stale
        own = self.item_blocks(train, ids)
        flat = own.reshape(len(ids), -1)
        if residual is not None:
            flat = flat + residual[ids]
        return self._served(flat, ids, warm), flat.reshape(own.shape)

    def scores(self, users: torch.Tensor, hist: torch.Tensor, hist_mask: torch.Tensor,
               items: torch.Tensor | None = None) -> torch.Tensor:
        """(b,) users, (b, h) history ids right-aligned, (b, h) mask -> (b, n_items) scores."""
        if items is None:
            items, _ = self.item_vectors(train=self.training)
        user = self.user_tower(items[hist], hist_mask)
        if self.cfg.normalize:
            user = nn.functional.normalize(user, dim=-1)
        return user @ items.T / self.cfg.temperature

    def _rows(self, ids: torch.Tensor | None) -> torch.Tensor:
        """Rows of a scored table (every item, or the sample ``ids``) that are catalog items."""
        return self.catalog.nonzero().squeeze(1) if ids is None else self.catalog[ids].nonzero().squeeze(1)

    def query_loss(self, items: torch.Tensor, sample: int = 256, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-modal retrieval from query content, as served (TrainedFusion.user_vector, no history):
        an item's content in ONE random modality, fused alone, goes through the user tower's query path
        and must rank that item first among the scored items (softmax). This trains ``UserTower.query_out``
        to fill the blocks a one-modality query lacks, so a text query scores image and audio too.

        Args:
            items: (c, dim) fused item vectors as scored (``batch_items``): every item, or the items ``ids``.
        """
        mods = self.item_tower.modalities
        rows = self._rows(ids)
        if not mods or not len(rows):
            return torch.zeros(())
        pos = rows[torch.randperm(len(rows))[:sample]]  # rows of ``items``
        idx = pos if ids is None else ids[pos]  # item ids
        pick = torch.randint(len(mods), (len(idx),))
        present = {m: (pick == k) & self.present[m][idx] for k, m in enumerate(mods)}
        no_id = torch.zeros(len(idx), dtype=torch.bool)
        query = self.item_tower({m: x[idx] for m, x in self.features.items()}, present, torch.zeros_like(idx), no_id)
        empty = torch.zeros(len(idx), 1, self.item_tower.dim)
        user = self.user_tower(empty, torch.zeros(len(idx), 1, dtype=torch.bool), query.reshape(len(idx), -1))
        if self.cfg.normalize:
            user = nn.functional.normalize(user, dim=-1)
        catalog = self.catalog if ids is None else self.catalog[ids]
        logits = (user @ items.T / self.cfg.temperature).masked_fill(~catalog, -torch.inf)
        return nn.functional.cross_entropy(logits, pos)

    def align_loss(self, blocks: torch.Tensor, sample: int = 512, ids: torch.Tensor | None = None) -> torch.Tensor:
        """InfoNCE between an item's content blocks (pairs of modalities), on a random sample of the scored
        items (``blocks``: every item, or the items ``ids``)."""
        parts = self.item_tower.modalities
        if len(parts) < 2:
            return torch.zeros(())
        rows = self._rows(ids)  # items held out of training are held out here too
        idx = rows[torch.randperm(len(rows))[:sample]]
        z = nn.functional.normalize(blocks[idx, : len(parts)], dim=-1)  # (s, M, d)
        loss, pairs = torch.zeros(()), 0
        target = torch.arange(len(idx))
        for a in range(len(parts)):
            for b in range(a + 1, len(parts)):
                logits = z[:, a] @ z[:, b].T / self.cfg.align_temperature
                loss = loss + nn.functional.cross_entropy(logits, target) + \
                    nn.functional.cross_entropy(logits.T, target)
                pairs += 2
        return loss / pairs


def _stack_normalised(features: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Concatenate centred unit-norm modality vectors: (n, sum d_m), each modality weighted equally.

    Centred on the ``rows`` (bool (n,)) items only: items held out of training do not move the mean.
    """
    parts = centred_units(dict(enumerate(features)), {i: x[rows].mean(0) for i, x in enumerate(features)})
    return np.concatenate(parts, axis=1)


def _item_graph(data: InteractionData, cfg: TrainConfig, content_mods: list[str], known: torch.Tensor,
                catalog: torch.Tensor) -> torch.Tensor:
    """(n_items, n_items) sparse CSR item-item operator from the train split: co-occurrence top-k, blended
    FREEDOM-style with a frozen kNN graph over ``content_mods`` (the variant's own content; none = co-occurrence
    only); O(n_items · k) entries."""
    graph = cooccurrence_graph(data.train, data.n_users, data.n_items, cfg.cooc_k)
    if content_mods and cfg.content_graph_weight > 0:
        content = content_knn_graph(_stack_normalised([data.features[m] for m in content_mods], catalog.numpy()),
                                    cfg.content_k, known.numpy(), catalog.numpy())
        graph = (1 - cfg.content_graph_weight) * graph + cfg.content_graph_weight * content
    return to_torch(graph)
