"""The paper's FedU-Net baseline: MONAI's BasicUNet behind the same interface as the prompt-free SAM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UNetSegmenter(nn.Module):
    """Image ``(B, 3, S, S)`` in [0, 1] -> logits ``(B, C, S/4, S/4)``, like :class:`PromptFreeSAM`, so the
    same data, trainer, metrics and FLARE jobs serve both. The U-Net works at the mask resolution (the
    image is shrunk first), which is also where it is scored."""

    def __init__(self, num_classes: int, image_size: int = 1024, features=(32, 32, 64, 128, 256, 32)):
        # imported here: importing MONAI costs every process ~2-3 CPU-s, and the server's model only needs SAM
        from fedfms import monai_import  # noqa: F401
        from monai.networks.nets import BasicUNet

        super().__init__()
        self.image_size = image_size
        self.mask_size = image_size // 4
        self.unet = BasicUNet(spatial_dims=2, in_channels=3, out_channels=num_classes, features=tuple(features))

    @property
    def num_classes(self) -> int:
        return self.unet.final_conv.out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.mask_size, self.mask_size), mode="bilinear", align_corners=False, antialias=True)
        return self.unet(x)
