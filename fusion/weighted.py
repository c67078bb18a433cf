"""Fusion v0: deterministic weighted block fusion (no training).

Each modality vector is L2-normalised and projected to ``block_dim`` by a fixed seeded
orthonormal map (zero-padded when the input is smaller), then placed in its own block of the
fused vector scaled by sqrt(weight). With both sides built this way, ``user @ item`` is the
weight-averaged cosine over the modalities both sides have, and each block's dot product is
that modality's exact contribution. The user vector is a recency-weighted mean of history
item vectors (half-life in events) mixed with the query content built like an item.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from fusionrec.fusion.base import FusionModel


class WeightedBlockFusion(FusionModel):
    name = "weighted-v0"

    def __init__(
        self,
        modality_dims: dict[str, int],
        weights: dict[str, float] | None = None,
        block_dim: int = 256,
        history_half_life_events: float = 10.0,
        history_weight: float = 1.0,
        query_weight: float = 1.0,
        seed: int = 0,
        encoder_versions: dict[str, str] | None = None,
    ) -> None:
        # encoder_versions: accepted for the common constructor; a fixed projection fits any encoder.
        super().__init__(modality_dims)
        self.modalities = sorted(modality_dims)
        self.weights = {m: float((weights or {}).get(m, 1.0)) for m in self.modalities}
        if any(w <= 0 for w in self.weights.values()):
            raise ValueError(f"fusion weights must be positive, got {self.weights}")
        self.block_dim = block_dim
        self.half_life = history_half_life_events
        self.history_weight = history_weight
        self.query_weight = query_weight
        rng = np.random.default_rng(seed)
        self._proj = {m: self._projection(modality_dims[m], block_dim, rng) for m in self.modalities}
        params = json.dumps([self.modality_dims, self.weights, block_dim, seed], sort_keys=True)
        self._version = f"{self.name}@{hashlib.sha1(params.encode()).hexdigest()[:10]}"

    @staticmethod
    def _projection(in_dim: int, out_dim: int, rng: np.random.Generator) -> np.ndarray:
        """(in_dim, out_dim) map with orthonormal columns (or rows, when in_dim < out_dim)."""
        gauss = rng.standard_normal((max(in_dim, out_dim), min(in_dim, out_dim)))
        q, _ = np.linalg.qr(gauss)
        return (q if in_dim >= out_dim else q.T).astype(np.float32)

    @property
    def version(self) -> str:
        return self._version

    @property
    def dim(self) -> int:
        return self.block_dim * len(self.modalities)

    def _block(self, modality: str) -> slice:
        i = self.modalities.index(modality)
        return slice(i * self.block_dim, (i + 1) * self.block_dim)

    def _fuse(self, vectors: dict[str, np.ndarray]) -> np.ndarray:
        """modality -> (d_m,) to one (dim,) unit vector."""
        self.check_modalities(vectors)
        out = np.zeros(self.dim, dtype=np.float32)
        for modality, vec in vectors.items():
            projected = vec.astype(np.float32) @ self._proj[modality]
            norm = np.linalg.norm(projected)
            if norm > 0:
                out[self._block(modality)] = np.sqrt(self.weights[modality]) * projected / norm
        total = np.linalg.norm(out)
        if total == 0:
            raise ValueError("no usable modality vector (all empty or zero)")
        return out / total

    def item_vectors(self, items: list[dict[str, np.ndarray]], item_ids: list[str] | None = None) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._fuse(item) for item in items])

    def user_vector(self, history: np.ndarray, query: dict[str, np.ndarray]) -> np.ndarray:
        parts = []
        if len(history):
            age = np.arange(len(history) - 1, -1, -1, dtype=np.float32)  # newest has age 0
            decay = 0.5 ** (age / self.half_life)
            mean = decay @ history.astype(np.float32)
            parts.append(self.history_weight * mean / max(np.linalg.norm(mean), 1e-12))
        if query:
            parts.append(self.query_weight * self._fuse(query))
        if not parts:
            raise ValueError("a user vector needs history or query content")
        user = np.sum(parts, axis=0)
        return (user / max(np.linalg.norm(user), 1e-12)).astype(np.float32)

    def contributions(self, user: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        return {m: (items[:, self._block(m)] @ user[self._block(m)]).astype(np.float32)
                for m in self.modalities}
