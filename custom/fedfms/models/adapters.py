"""Medical SAM Adapter (MSA): two bottleneck adapters in every ViT block of SAM's image encoder.

The adapted block reuses the original block's modules under their original attribute names, so the
official checkpoint keys (``image_encoder.blocks.N.attn.qkv.weight`` ...) load unchanged and only the
adapter keys are new.
"""

from __future__ import annotations

import torch
from torch import nn
from segment_anything.modeling.image_encoder import Block, ImageEncoderViT, window_partition, window_unpartition

ADAPTER_ATTRS = ("space_adapter", "mlp_adapter")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Adapter(nn.Module):
    """Bottleneck ``Linear(D, D*ratio) -> act -> Linear(D*ratio, D)``, optionally with a skip connection.

    The up-projection starts at zero so an adapted pretrained SAM computes exactly what SAM computes
    until training moves the adapters."""

    def __init__(self, dim: int, ratio: float = 0.25, activation: str = "gelu", skip: bool = True):
        super().__init__()
        hidden = int(dim * ratio)
        self.down = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(hidden, dim)
        self.skip = skip
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.act(self.down(x)))
        return x + y if self.skip else y


class AdaptedBlock(nn.Module):
    """segment-anything's ``Block`` with a space adapter after attention and an MLP adapter beside the MLP:

    ``x = shortcut + SpaceAdapter(attn(norm1(x)))``;  ``x = x + mlp(norm2(x)) + scale * MLPAdapter(norm2(x))``
    """

    def __init__(self, block: Block, ratio: float = 0.25, activation: str = "gelu", mlp_adapter_scale: float = 0.5):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size
        dim = block.norm1.normalized_shape[0]
        self.space_adapter = Adapter(dim, ratio, activation, skip=True)
        self.mlp_adapter = Adapter(dim, ratio, activation, skip=False)
        self.mlp_adapter_scale = mlp_adapter_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (height, width))
        x = shortcut + self.space_adapter(x)
        xn = self.norm2(x)
        return x + self.mlp(xn) + self.mlp_adapter_scale * self.mlp_adapter(xn)


def add_adapters(encoder: ImageEncoderViT, ratio: float = 0.25, activation: str = "gelu") -> ImageEncoderViT:
    """Replace every block of ``encoder`` in place by an :class:`AdaptedBlock`."""
    for i, block in enumerate(encoder.blocks):
        if not isinstance(block, AdaptedBlock):
            encoder.blocks[i] = AdaptedBlock(block, ratio, activation)
    return encoder


def is_adapter_key(key: str) -> bool:
    return any(f".{attr}." in key for attr in ADAPTER_ATTRS)
