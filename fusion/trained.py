"""The trained fusion model as served: item tower + user tower loaded from a checkpoint.

Fused vectors are block-structured (one block per part: each content modality, plus "id"),
and the user vector uses the same layout, so ``user @ item`` splits exactly into per-part
dot products (``contributions``). Checkpoints trained with ``normalize`` serve unit item rows
(cosine); otherwise the item norm carries what the model learned about an item's overall appeal
(the store scores by inner product either way).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fusion.base import FusionModel
from fusion.checkpoint import load_checkpoint
from fusion.towers import ID_PART, ItemTower, UserTower
from fusion.training import MAX_HISTORY

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
        self.item_tower = ItemTower(dims, int(payload["n_id_rows"]), self.block_dim, hidden=int(payload["hidden"]))
        self.item_tower.load_state_dict(payload["item_tower"])
        self.user_tower = UserTower(self.item_tower.dim)
        self.user_tower.load_state_dict(payload["user_tower"])
        self.item_tower.eval()
        self.user_tower.eval()
        self._row = {item_id: int(r) for item_id, r in zip(payload["item_ids"], payload["id_rows"].tolist())}
        self._slot = {item_id: k for k, item_id in enumerate(payload["item_ids"])}
        residual = payload.get("graph_residual")
        self._residual = None if residual is None else residual.float().numpy()
        self._normalize = bool(payload.get("normalize", False))

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
        return self.item_tower.dim

    def _block(self, part: str) -> slice:
        i = self.parts.index(part)
        return slice(i * self.block_dim, (i + 1) * self.block_dim)

    @torch.no_grad()
    def _fuse(self, items: list[dict[str, np.ndarray]], item_ids: list[str] | None) -> np.ndarray:
        """Content (+ id) blocks of each item -> (n, dim) float32, before graph residuals."""
        n = len(items)
        feats, present = {}, {}
        for m in self.modalities:
            x = np.zeros((n, self.item_tower.heads[m][1].in_features), dtype=np.float32)
            mask = np.zeros(n, dtype=bool)
            for r, item in enumerate(items):
                if m in item:
                    x[r] = item[m]
                    mask[r] = True
            feats[m], present[m] = torch.from_numpy(x), torch.from_numpy(mask)
        rows = [self._row.get(i, -1) for i in item_ids] if item_ids is not None else [-1] * n
        idx = torch.as_tensor(rows, dtype=torch.long)
        blocks = self.item_tower(feats, present, idx, idx >= 0)
        return blocks.reshape(n, -1).numpy().astype(np.float32)

    def item_vectors(self, items: list[dict[str, np.ndarray]], item_ids: list[str] | None = None) -> np.ndarray:
        """Item tower. Items whose id the checkpoint never saw get content blocks only (cold start).

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
        out = self._fuse(items, item_ids)
        if self._residual is not None and item_ids is not None:
            for r, item_id in enumerate(item_ids):
                slot = self._slot.get(item_id)
                if slot is not None:
                    out[r] += self._residual[slot]
        if self._normalize:  # trained with cosine scores: unit rows, as evaluated
            out /= np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)
        return out

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
        hist = torch.from_numpy(history).unsqueeze(0)  # (1, h, dim)
        mask = torch.ones(1, len(history), dtype=torch.bool)
        q = torch.from_numpy(self._fuse([usable_query], None)) if usable_query else None
        if not len(history):
            hist, mask = torch.zeros(1, 1, self.dim), torch.zeros(1, 1, dtype=torch.bool)
        user = self.user_tower(hist, mask, q)[0].numpy()
        return (user / max(float(np.linalg.norm(user)), 1e-12)).astype(np.float32)

    def contributions(self, user: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """Per part ("text", "vggish", ..., "id"): block dot products; they sum to ``items @ user``."""
        items = np.asarray(items, dtype=np.float32).reshape(-1, self.dim)
        return {p: (items[:, self._block(p)] @ user[self._block(p)]).astype(np.float32) for p in self.parts}


__all__ = ["TrainedFusion", "ID_PART"]
