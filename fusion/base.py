"""The fusion interface: item tower, user tower and per-modality score attribution."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np


class FusionModel(ABC):
    """Maps per-modality item vectors and user histories into one space scored by inner product.

    Implementations are plain NumPy/PyTorch; ``modality_dims`` (modality -> input dim) is
    fixed at construction and must match the encoders the stored vectors came from.
    """

    name: ClassVar[str]

    def __init__(self, modality_dims: dict[str, int]) -> None:
        self.modality_dims = dict(modality_dims)

    @property
    @abstractmethod
    def version(self) -> str:
        """Identifies the fused space: fused vectors of another version must be re-indexed."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of fused vectors."""

    @abstractmethod
    def item_vectors(self, items: list[dict[str, np.ndarray]], item_ids: list[str] | None = None) -> np.ndarray:
        """Item tower.

        Args:
            items: per item, modality -> (modality_dims[m],) vector; any non-empty subset.
            item_ids: the items' ids, for models with learned per-item embeddings (ignored otherwise).
        Returns:
            (len(items), dim) float32, unit rows.
        """

    @abstractmethod
    def user_vector(self, history: np.ndarray, query: dict[str, np.ndarray]) -> np.ndarray:
        """User tower.

        Args:
            history: (h, dim) fused vectors of the user's items, oldest first; h may be 0.
            query: modality -> (modality_dims[m],) query content vectors; may be empty.
        Returns:
            (dim,) float32 unit vector. At least one of history/query must be non-empty.
        """

    @abstractmethod
    def contributions(self, user: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """Split scores ``items @ user`` into additive per-modality parts.

        Args:
            user: (dim,); items: (n, dim).
        Returns:
            modality -> (n,) float32; the parts sum to the inner product.
        """

    def check_modalities(self, vectors: dict[str, np.ndarray]) -> None:
        """Raise ValueError for an unknown modality or a vector of the wrong length."""
        for modality, vec in vectors.items():
            if modality not in self.modality_dims:
                raise ValueError(f"unknown modality {modality!r}; known: {sorted(self.modality_dims)}")
            if vec.shape != (self.modality_dims[modality],):
                raise ValueError(f"{modality} vector has shape {vec.shape}, "
                                 f"expected ({self.modality_dims[modality]},)")
