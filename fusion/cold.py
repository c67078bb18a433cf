"""Cold start: an item with no interactions borrows behaviour from its nearest warm items by content.

Such an item has no id embedding and no graph edge, so its vector is content blocks only. Here it
takes a share of its vector from the served vectors of its k most similar warm items (cosine of
centred, unit content features), weighted by similarity. Warm vectors are never changed, so a new
item can be placed at upsert time without touching the rest of the store. Plain NumPy/PyTorch,
the same code in training, evaluation and serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


#: Similarities computed at once when matching cold items (~64 MiB of float32).
NEIGHBOUR_BLOCK_ENTRIES = 1 << 24


def centred_units(features: dict[str, np.ndarray], means: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Per modality (in ``means`` order): (n, d_m) float32 rows minus the mean, L2-normalised."""
    parts = []
    for m, mean in means.items():
        x = np.asarray(features[m], dtype=np.float32) - mean
        parts.append(x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12))
    return parts


def content_keys(features: dict[str, np.ndarray], means: dict[str, np.ndarray]) -> np.ndarray:
    """Per modality centred and L2-normalised, concatenated, scaled to unit rows.

    Args:
        features: modality -> (n, d_m) raw vectors (same modalities and order as ``means``).
        means: modality -> (d_m,) mean of the warm items' vectors.
    Returns:
        (n, sum d_m) float32 unit rows (cosine of two keys = mean of the per-modality cosines).
    """
    parts = centred_units(features, means)
    return (np.concatenate(parts, axis=1) / np.sqrt(len(parts))).astype(np.float32)


def neighbours(query: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar keys per query row and their weights.

    Args:
        query: (c, D) unit rows; keys: (w, D) unit rows of the warm items.
    Returns:
        (c, k) int64 rows of ``keys`` and (c, k) float32 weights: positive cosines normalised to sum
        to 1 (a row with no positive cosine has all-zero weights and borrows nothing).
    """
    k = min(k, len(keys))
    # A block of queries at a time: memory ~ block x warm items, never cold x warm at once.
    step = max(1, NEIGHBOUR_BLOCK_ENTRIES // max(len(keys), 1))
    idx = np.zeros((len(query), k), dtype=np.int64)
    w = np.zeros((len(query), k), dtype=np.float32)
    for a in range(0, len(query), step):
        sim = query[a:a + step] @ keys.T
        idx[a:a + step] = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        w[a:a + step] = np.take_along_axis(sim, idx[a:a + step], 1).clip(min=0.0)
    total = w.sum(1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    return idx.astype(np.int64), w.astype(np.float32)


@dataclass(frozen=True)
class ColdStart:
    """How items without interactions are placed: ``k`` neighbours, ``share`` of the vector from them.

    ``keys`` are the warm items' content keys (rows aligned with the warm vectors passed to
    ``borrow``); ``means`` centre new items' features the same way.
    """

    modalities: tuple[str, ...]
    means: dict[str, np.ndarray]
    keys: np.ndarray
    k: int
    share: float

    @classmethod
    def fit(cls, features: dict[str, np.ndarray], warm: np.ndarray, modalities: tuple[str, ...], k: int,
            share: float) -> "ColdStart":
        """Keys over ``modalities`` for the ``warm`` rows (bool (n,) or int ids) of ``features``."""
        means = {m: np.asarray(features[m][warm], dtype=np.float32).mean(0) for m in modalities}
        keys = content_keys({m: features[m][warm] for m in modalities}, means)
        return cls(tuple(modalities), means, keys, int(k), float(share))

    def usable(self, item: dict[str, np.ndarray]) -> bool:
        return all(m in item for m in self.modalities)

    def match(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """modality -> (c, d_m) raw vectors of cold items -> their (c, k) warm neighbour rows and weights."""
        return neighbours(content_keys(features, self.means), self.keys, self.k)

    def borrow(self, own: torch.Tensor, features: dict[str, np.ndarray], warm_vectors: torch.Tensor) -> torch.Tensor:
        """``blend`` with the neighbours ``match`` finds for ``features`` ((c, d_m) per modality)."""
        return self.blend(own, self.match(features), warm_vectors)

    def blend(self, own: torch.Tensor, matched: tuple[np.ndarray, np.ndarray], warm_vectors: torch.Tensor
              ) -> torch.Tensor:
        """Blend cold items' unit vectors with their neighbours' served vectors.

        Args:
            own: (c, dim) unit vectors of the cold items (content blocks only).
            matched: ``match`` of the same items: (c, k) rows of ``warm_vectors`` and weights.
            warm_vectors: (w, dim) unit vectors of the warm items, rows aligned with ``keys``.
        Returns:
            (c, dim) unit vectors: normalise((1 - share) * own + share * sum_j w_ij warm_j).
        """
        idx, w = matched
        borrowed = (warm_vectors[torch.from_numpy(idx)] * torch.from_numpy(w).unsqueeze(-1)).sum(1)
        has = torch.from_numpy(w.sum(1) > 0).unsqueeze(-1)
        mixed = torch.where(has, (1 - self.share) * own + self.share * borrowed, own)
        return torch.nn.functional.normalize(mixed, dim=-1)

    def to_payload(self) -> dict:
        return {"modalities": list(self.modalities), "means": {m: torch.from_numpy(v) for m, v in self.means.items()},
                "keys": torch.from_numpy(self.keys), "k": self.k, "share": self.share}

    @classmethod
    def from_payload(cls, p: dict) -> "ColdStart":
        return cls(tuple(p["modalities"]), {m: v.float().numpy() for m, v in p["means"].items()},
                   p["keys"].float().numpy(), int(p["k"]), float(p["share"]))
