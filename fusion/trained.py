"""The trained fusion model as served: item tower + user tower loaded from a checkpoint.

Fused vectors are block-structured (one block per part: each content modality, plus "id"),
and the user vector uses the same layout, so ``user @ item`` splits exactly into per-part
dot products (``contributions``). Checkpoints trained with ``normalize`` serve unit item rows
(cosine); otherwise the item norm carries what the model learned about an item's overall appeal
(the store scores by inner product either way).

An ensemble checkpoint (K members) serves the members' unit vectors concatenated and scaled by
1/sqrt(K): ``user @ item`` is then the mean of the members' cosines, exactly as evaluated.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fusionrec.fusion.base import FusionModel
from fusionrec.fusion.checkpoint import load_checkpoint
from fusionrec.fusion.cold import ColdStart
from fusionrec.fusion.towers import ID_PART, MAX_HISTORY, ItemTower, build_user_tower

log = logging.getLogger("fusionrec.fusion")


class TrainedFusion(FusionModel):
    """Serve a checkpoint written by ``fusionrec train``.

    Args:
        modality_dims: modality -> dim the server's encoders/precomputed vectors provide.
        checkpoint: path of a ``.pt`` checkpoint.
        encoder_versions: modality -> encoder version the server uses; when given, every
            modality the checkpoint needs must match (vectors of another encoder are another space).
    Raises:
        ValueError: a modality the checkpoint was trained on has another dim or encoder version.
    """

    name = "trained"

    def __init__(self, modality_dims: dict[str, int], checkpoint: str, encoder_versions: dict[str, str] | None = None
                 ) -> None:
        super().__init__(modality_dims)
        payload, digest = load_checkpoint(checkpoint)
        self._check_provenance(payload, checkpoint, encoder_versions)
        self.checkpoint_path = str(checkpoint)
        self.meta = {k: payload[k] for k in ("dataset", "variant", "seed", "modalities", "metrics")}
        self._version = f"{self.name}@{digest}"
        self.modalities = list(payload["modalities"])
        self.parts = list(payload["parts"])
        self.block_dim = int(payload["block_dim"])
        dims = {m: int(spec["dim"]) for m, spec in payload["modalities"].items()}
        # Checkpoints written before user towers had kinds carry none: theirs is the attention tower.
        self.user_tower = str(payload.get("user_tower", "attention"))
        self._members = [_Member(m, dims, int(payload["n_id_rows"]), self.block_dim, int(payload["hidden"]),
                                 self.user_tower) for m in payload["members"]]
        self.member_dim = self._members[0].item_tower.dim
        self._row = {item_id: int(r) for item_id, r in zip(payload["item_ids"], payload["id_rows"].tolist())}
        self._slot = {item_id: k for k, item_id in enumerate(payload["item_ids"])}
        self._normalize = bool(payload.get("normalize", False))
        if len(self._members) > 1 and not self._normalize:
            raise ValueError(f"checkpoint {checkpoint}: an ensemble must be trained with normalize=True")
        self._scale = float(1.0 / np.sqrt(len(self._members)))  # K unit member vectors -> one unit vector
        cold = payload.get("cold_start")  # absent in checkpoints written before cold-start borrowing
        has_neighbours = all(m.cold_neighbours is not None for m in self._members)
        self._cold = ColdStart.from_payload(cold) if cold and has_neighbours and self._normalize else None

    def _check_provenance(self, payload: dict, checkpoint: str, encoder_versions: dict[str, str] | None) -> None:
        for m, spec in payload["modalities"].items():
            if m not in self.modality_dims:
                log.warning("checkpoint %s uses modality %r the server does not provide; items score without it",
                            checkpoint, m)
                continue
            if int(self.modality_dims[m]) != int(spec["dim"]):
                raise ValueError(f"checkpoint {checkpoint} was trained on {m} vectors of dim {spec['dim']} "
                                 f"({spec['version']}), but the server provides dim {self.modality_dims[m]}")
            have = (encoder_versions or {}).get(m)
            if have is not None and have != spec["version"]:
                raise ValueError(f"checkpoint {checkpoint} was trained on {m} encoder {spec['version']!r}, "
                                 f"but the server's {m} encoder is {have!r}: retrain or switch the encoder back")

    @property
    def version(self) -> str:
        return self._version

    @property
    def dim(self) -> int:
        return self.member_dim * len(self._members)

    @property
    def members(self) -> int:
        return len(self._members)

    def _blocks(self, part: str) -> list[slice]:
        """Where ``part``'s block sits in each member's slice of a served vector."""
        i = self.parts.index(part)
        return [slice(k * self.member_dim + i * self.block_dim, k * self.member_dim + (i + 1) * self.block_dim)
                for k in range(len(self._members))]

    def _inputs(self, items: list[dict[str, np.ndarray]], item_ids: list[str] | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """Per item modality vectors -> (feats, present, id rows) tensors for the item towers."""
        n = len(items)
        feats, present = {}, {}
        tower = self._members[0].item_tower
        for m in self.modalities:
            x = np.zeros((n, tower.heads[m][1].in_features), dtype=np.float32)
            mask = np.zeros(n, dtype=bool)
            for r, item in enumerate(items):
                if m in item:
                    x[r] = item[m]
                    mask[r] = True
            feats[m], present[m] = torch.from_numpy(x), torch.from_numpy(mask)
        rows = [self._row.get(i, -1) for i in item_ids] if item_ids is not None else [-1] * n
        return feats, present, torch.as_tensor(rows, dtype=torch.long)

    def item_vectors(self, items: list[dict[str, np.ndarray]], item_ids: list[str] | None = None) -> np.ndarray:
        """Item tower. Items whose id the checkpoint never saw get content blocks, blended with their
        nearest known items by content when the checkpoint has cold-start neighbours (fusionrec.fusion.cold).

        Args:
            items: per item, modality -> (modality_dims[m],) vector; modalities the checkpoint
                was not trained on are ignored.
            item_ids: ids matching the checkpoint's training ids (enables id block + graph residual).
        Returns:
            (len(items), dim) float32.
        """
        if item_ids is not None and len(item_ids) != len(items):
            raise ValueError(f"{len(item_ids)} item ids for {len(items)} items")
        for item in items:
            self.check_modalities(item)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        has_id = [item_ids is not None and item_ids[r] in self._row for r in range(len(items))]
        for r, item in enumerate(items):
            if not has_id[r] and not any(m in item for m in self.modalities):
                raise ValueError(f"item {r} has none of the modalities {self.modalities} and no known id")
        inputs = self._inputs(items, item_ids)
        slots = [self._slot.get(i) for i in item_ids] if item_ids is not None else [None] * len(items)
        rows = [r for r, slot in enumerate(slots) if slot is not None]
        cold = [r for r in range(len(items))
                if not has_id[r] and self._cold is not None and self._cold.usable(items[r])]
        # Same keys for every member: match the new items to known ones once.
        matched = self._cold.match({m: np.stack([items[r][m] for r in cold]) for m in self._cold.modalities}
                                   ) if cold else None
        parts = []
        for member in self._members:
            out = member.fuse(*inputs)
            if member.residual is not None and rows:
                out[rows] += member.residual[[slots[r] for r in rows]]
            if self._normalize:  # trained with cosine scores: unit rows, as evaluated
                out /= np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)
            if cold:
                out[cold] = self._cold.blend(torch.from_numpy(out[cold]), matched, member.cold_neighbours).numpy()
            parts.append(out)
        return (np.concatenate(parts, axis=1) * self._scale).astype(np.float32)

    @torch.no_grad()
    def user_vector(self, history: np.ndarray, query: dict[str, np.ndarray]) -> np.ndarray:
        """User tower over the (h, dim) history (oldest first) and optional query content.

        Returns:
            (dim,) float32 unit vector (scale never changes a user's ranking).
        """
        history = np.asarray(history, dtype=np.float32).reshape(-1, self.dim)[-MAX_HISTORY:]
        query = {m: v for m, v in query.items()}
        self.check_modalities(query)
        usable_query = {m: v for m, v in query.items() if m in self.modalities}
        if not len(history) and not usable_query:
            raise ValueError("a user vector needs history or query content in "
                             f"{self.modalities} (got query modalities {sorted(query)})")
        inputs = self._inputs([usable_query], None) if usable_query else None
        mask = torch.ones(1, len(history), dtype=torch.bool)
        if not len(history):
            history, mask = np.zeros((1, self.dim), np.float32), torch.zeros(1, 1, dtype=torch.bool)
        parts = []
        for k, member in enumerate(self._members):
            own = history[:, k * self.member_dim:(k + 1) * self.member_dim] / self._scale  # the member's own vectors
            q = torch.from_numpy(member.fuse(*inputs)) if inputs else None
            user = member.user_tower(torch.from_numpy(np.ascontiguousarray(own)).unsqueeze(0), mask, q)[0].numpy()
            parts.append(user / max(float(np.linalg.norm(user)), 1e-12))
        return (np.concatenate(parts) * self._scale).astype(np.float32)

    def contributions(self, user: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """Per part ("text", "vggish", ..., "id"): block dot products summed over members; they sum to
        ``items @ user``."""
        items = np.asarray(items, dtype=np.float32).reshape(-1, self.dim)
        return {p: sum(items[:, b] @ user[b] for b in self._blocks(p)).astype(np.float32) for p in self.parts}


class _Member:
    """One net of a checkpoint: its item tower, user tower, frozen graph residuals and cold-start neighbours."""

    def __init__(self, weights: dict, dims: dict[str, int], n_id_rows: int, block_dim: int, hidden: int,
                 user_tower: str = "attention") -> None:
        self.item_tower = ItemTower(dims, n_id_rows, block_dim, hidden=hidden)
        self.item_tower.load_state_dict(weights["item_tower"])
        self.user_tower = build_user_tower(user_tower, self.item_tower.dim)
        self.user_tower.load_state_dict(weights["user_tower"])
        self.item_tower.eval()
        self.user_tower.eval()
        residual = weights.get("graph_residual")
        self.residual = None if residual is None else residual.float().numpy()
        warm = weights.get("cold_neighbours")  # (n_known, member dim) served vectors new items borrow from
        self.cold_neighbours = None if warm is None else warm.float()

    @torch.no_grad()
    def fuse(self, feats: dict[str, torch.Tensor], present: dict[str, torch.Tensor], idx: torch.Tensor) -> np.ndarray:
        """Content (+ id) blocks -> (n, member dim) float32, before graph residuals."""
        blocks = self.item_tower(feats, present, idx, idx >= 0)
        return blocks.reshape(len(idx), -1).numpy().astype(np.float32)


__all__ = ["TrainedFusion", "ID_PART"]
