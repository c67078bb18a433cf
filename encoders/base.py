"""The one interface every modality encoder implements (plain Python, no Ray)."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fusionrec.core.errors import InvalidArgument
from fusionrec.encoders.identity import derive_version

MODALITIES = ("text", "image", "audio")


class InvalidContent(InvalidArgument):
    """Content an encoder cannot use: empty, corrupt, truncated or of an unsupported format.

    Args:
        modality: "text", "image" or "audio".
        reason: what is wrong, phrased for the caller.
        index: position of the offending input in the batch, when known.
    """

    def __init__(self, modality: str, reason: str, index: int | None = None) -> None:
        self.modality = modality
        self.reason = reason
        self.index = index
        super().__init__(f"invalid {modality} content: {reason}")

    def __reduce__(self):  # keep fields when pickled across processes (Ray)
        return (InvalidContent, (self.modality, self.reason, self.index))


class Encoder(ABC):
    """Turns raw content of one modality into L2-normalised float32 vectors.

    Subclasses set ``name`` (registry key) and ``modality``, and implement ``dim``,
    ``prepare`` (decode/validate ONE input, cheap to isolate per request) and ``embed``
    (run the model on a batch of prepared inputs). For ``version`` they declare what shapes
    their vectors: ``weight_files``, ``vector_options`` and ``fixed_settings``.
    """

    name: ClassVar[str]
    modality: ClassVar[str]
    #: Constructor options that change the vectors, each kept on the instance under the same
    #: name (options such as ``device`` or ``num_threads`` do not change them).
    vector_options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def weight_files(cls) -> dict[str, Path]:
        """label -> a weight file the encoder loads (tokenizer files count); none by default."""
        return {}

    @classmethod
    def fixed_settings(cls) -> dict[str, Any]:
        """Settings in the code that shape the vectors (preprocessing constants, library versions)."""
        return {}

    @classmethod
    def version_for(cls, **options: Any) -> str:
        """The version an instance built with ``options`` has, without loading the model.

        Raises:
            TypeError: an option the constructor does not take.
        """
        bound = inspect.signature(cls.__init__).bind(None, **options)
        bound.apply_defaults()
        chosen = {o: bound.arguments[o] for o in cls.vector_options}
        return derive_version(cls.name, cls.weight_files(), {"options": chosen, "fixed": cls.fixed_settings()})

    @property
    def version(self) -> str:
        """Identifies the vector space, ``<name>@<12 hex>`` (encoders/identity.py): stored vectors of
        another version are not comparable. Derived once per instance."""
        cached = self.__dict__.get("_version")
        if cached is None:
            cached = self.version_for(**{o: getattr(self, o) for o in self.vector_options})
            self.__dict__["_version"] = cached
        return cached

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of the produced vectors."""

    @abstractmethod
    def prepare(self, content: Any) -> Any:
        """Decode and validate one input (str for text, bytes for image/audio).

        Raises:
            InvalidContent: the input is empty, corrupt or unsupported.
        """

    @abstractmethod
    def embed(self, prepared: list[Any]) -> np.ndarray:
        """Embed prepared inputs.

        Returns:
            float32 array of shape (len(prepared), dim), each row of unit L2 norm.
        """

    def encode(self, contents: list[Any]) -> np.ndarray:
        """prepare + embed; an InvalidContent names the offending position.

        Returns:
            float32 array of shape (len(contents), dim).
        """
        prepared = []
        for i, content in enumerate(contents):
            try:
                prepared.append(self.prepare(content))
            except InvalidContent as err:
                raise InvalidContent(err.modality, err.reason, index=i) from err
        if not prepared:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed(prepared)

    def warmup(self) -> None:
        """Run one tiny input through the model so the first real call is not slow."""


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation. x: (n, d) -> (n, d) float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)
