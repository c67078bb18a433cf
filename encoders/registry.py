"""Encoders by registry name; unknown names fail loudly."""

from __future__ import annotations

import importlib
from typing import Any

from fusionrec.encoders.base import Encoder

# name -> "module:Class"; imported lazily so a text-only worker never loads torchvision or librosa.
ENCODERS: dict[str, str] = {
    "minilm-l6-v2": "fusionrec.encoders.text_minilm:MiniLMTextEncoder",
    "efficientnet-lite0": "fusionrec.encoders.image_efficientnet:EfficientNetLiteImageEncoder",
    "efficientnet-lite2": "fusionrec.encoders.image_efficientnet_lite2:EfficientNetLite2ImageEncoder",
    "librosa-mel-mfcc": "fusionrec.encoders.audio_librosa:LibrosaAudioEncoder",
}


def encoder_class(name: str) -> type[Encoder]:
    """The Encoder subclass registered under ``name``."""
    try:
        target = ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {sorted(ENCODERS)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_encoder(name: str, **options: Any) -> Encoder:
    """Instantiate the encoder registered under ``name`` with its options."""
    return encoder_class(name)(**options)
