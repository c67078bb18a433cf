"""Item tower (gated per-part blocks) and user towers by name: order-aware attention pooling over the history,
or the same plus a GRU over the ordered history (sequence-aware)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ID_PART = "id"
#: Newest events a user tower reads (long MovieLens users would otherwise dominate memory); training pads to it.
MAX_HISTORY = 256


class ItemTower(nn.Module):
    """Per-part projection heads fused by a learned gate into a block-structured vector.

    Parts are the content modalities (in ``modality_dims`` order) plus, optionally, "id".
    Block p of the output is ``gate_p * head_p(x_p)``; the fused vector is the concatenation of
    blocks, so a user vector in the same layout scores it as a sum of per-part dot products.

    Args:
        modality_dims: modality -> input dim of its encoder vectors.
        n_items: size of the id table (0 = no id block).
        block_dim: output size of every block.
        feature_means: modality -> (d_m,) mean subtracted before L2 norm (centres e.g. vggish).
    """

    def __init__(self, modality_dims: dict[str, int], n_items: int, block_dim: int,
                 feature_means: dict[str, torch.Tensor] | None = None, hidden: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.modalities = list(modality_dims)
        self.parts = self.modalities + ([ID_PART] if n_items > 0 else [])
        self.block_dim = block_dim
        self.heads = nn.ModuleDict({m: nn.Sequential(nn.Dropout(dropout), nn.Linear(d, hidden), nn.GELU(),
                                                     nn.Linear(hidden, block_dim))
                                    for m, d in modality_dims.items()})
        for m, d in modality_dims.items():
            mean = (feature_means or {}).get(m, torch.zeros(d))
            self.register_buffer(f"mean_{m}", mean.float().clone())
        self.id_emb = nn.Embedding(n_items, block_dim) if n_items > 0 else None
        if self.id_emb is not None:
            nn.init.normal_(self.id_emb.weight, std=0.1)
        # Gate: one logit per part from the part's own block (attention over modalities).
        self.gate = nn.Linear(block_dim, 1)
        self.part_bias = nn.Parameter(torch.zeros(len(self.parts)))

    @property
    def dim(self) -> int:
        return self.block_dim * len(self.parts)

    def normalise(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(n, d_m) raw encoder vectors -> centred, unit rows."""
        x = x - getattr(self, f"mean_{modality}")  # a new tensor: the caller's vectors are never written
        if x.requires_grad:
            return F.normalize(x, dim=-1)
        # In place, as F.normalize computes it: one (n, d_m) temporary fewer (a large training batch's image
        # vectors alone are ~90 MB).
        return x.div_(x.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def forward(self, feats: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                item_idx: torch.Tensor | None = None, id_present: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse.

        Args:
            feats: modality -> (n, d_m) raw vectors (rows of absent items may hold anything).
            present: modality -> (n,) bool, which items have that modality.
            item_idx: (n,) id-table rows (any value where ``id_present`` is False).
            id_present: (n,) bool, items with a learned id embedding.
        Returns:
            (n, P, block_dim) gated blocks in ``self.parts`` order (absent parts are zero).
        """
        n = next(iter(present.values())).shape[0] if present else item_idx.shape[0]
        blocks, masks = [], []
        for m in self.modalities:
            if m in feats:
                blocks.append(self.heads[m](self.normalise(m, feats[m])))
                masks.append(present[m])
            else:
                blocks.append(torch.zeros(n, self.block_dim))
                masks.append(torch.zeros(n, dtype=torch.bool))
        if self.id_emb is not None:
            if item_idx is None or id_present is None:
                blocks.append(torch.zeros(n, self.block_dim))
                masks.append(torch.zeros(n, dtype=torch.bool))
            else:
                blocks.append(self.id_emb(item_idx.clamp(min=0)))
                masks.append(id_present)
        stacked = torch.stack(blocks, 1)  # (n, P, block_dim)
        mask = torch.stack(masks, 1)  # (n, P)
        logits = self.gate(torch.tanh(stacked)).squeeze(-1) + self.part_bias  # (n, P)
        logits = logits.masked_fill(~mask, -torch.inf)
        # Items with no part at all get zero weights instead of NaN.
        gate = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0) * mask.sum(1, keepdim=True).clamp(min=1)
        return stacked * gate.unsqueeze(-1)


class UserTower(nn.Module):
    """History of fused item vectors (oldest first) [+ query item vector] -> user vector.

    Attention pooling whose logits depend on the item and on its recency (order-aware), then a
    linear map into the scoring space (asymmetric: history items and candidates differ).

    Args:
        dim: fused vector size; max_age: recency buckets (older events share the last one).
    """

    def __init__(self, dim: int, max_age: int = 64) -> None:
        super().__init__()
        self.max_age = max_age
        self.att = nn.Linear(dim, 1)
        self.age_bias = nn.Parameter(torch.zeros(max_age))
        self.out = nn.Linear(dim, dim)
        self.query_out = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        nn.init.zeros_(self.query_out.weight)

    def forward(self, history: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            history: (b, h, dim) fused vectors, right-aligned newest last; mask: (b, h) bool real events.
            query: (b, dim) fused query-content vectors or None.
        Returns:
            (b, dim) user vectors.
        """
        b, h, _ = history.shape
        n_real = mask.sum(1, keepdim=True)  # (b, 1)
        # Age 0 = newest real event; positions are right-aligned so age = h - 1 - position.
        age = (h - 1 - torch.arange(h)).clamp(max=self.max_age - 1)
        logits = self.att(history).squeeze(-1) + self.age_bias[age]
        logits = logits.masked_fill(~mask, -torch.inf)
        weights = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0)
        # sqrt(n) scaling keeps the FISM-style confidence of long histories.
        pooled = (weights.unsqueeze(-1) * history).sum(1) * n_real.float().clamp(min=1).sqrt()
        user = self.out(pooled) * (n_real > 0)
        if query is not None:
            user = user + self.query_out(query) + query
        return user


class GRUUserTower(UserTower):
    """Sequence-aware user tower: attention pooling (``UserTower``) plus a GRU over the ordered history.

    The GRU reads the real events oldest first (padding never enters: packed sequences, so a padded training
    batch and one unpadded served history give the same vector); its last state is mapped into the scoring
    space by ``seq_out``, zero at init, so training starts from the pooling tower and learns what order adds.

    Args:
        dim: fused vector size; hidden: GRU state size; max_age: recency buckets of the pooling part.
    """

    def __init__(self, dim: int, max_age: int = 64, hidden: int = 128) -> None:
        super().__init__(dim, max_age)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.seq_out = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.seq_out.weight)

    def forward(self, history: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as ``UserTower.forward``: (b, h, dim) right-aligned history, (b, h) mask -> (b, dim)."""
        user = super().forward(history, mask, query)
        b, h, _ = history.shape
        lengths = mask.sum(1)
        if h == 0 or not bool((lengths > 0).any()):
            return user
        # Right-aligned -> left-aligned (real events first) so packing keeps exactly the real steps.
        shift = (torch.arange(h).unsqueeze(0) + (h - lengths).unsqueeze(1)) % h  # (b, h)
        left = history.gather(1, shift.unsqueeze(-1).expand(-1, -1, history.shape[2]))
        packed = nn.utils.rnn.pack_padded_sequence(left, lengths.clamp(min=1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, last = self.gru(packed)  # (1, b, hidden): the state after each user's newest real event
        return user + self.seq_out(last[0]) * (lengths > 0).unsqueeze(1)


#: User towers by name (``TrainConfig.user_tower``; a checkpoint records its kind, absent = "attention").
USER_TOWERS: dict[str, type[UserTower]] = {"attention": UserTower, "gru": GRUUserTower}


def build_user_tower(kind: str, dim: int) -> UserTower:
    """The user tower registered under ``kind`` for fused vectors of size ``dim``.

    Raises:
        ValueError: ``kind`` names no tower (the known names are listed).
    """
    try:
        cls = USER_TOWERS[kind]
    except KeyError:
        raise ValueError(f"unknown user tower {kind!r}; known: {sorted(USER_TOWERS)}") from None
    return cls(dim)
