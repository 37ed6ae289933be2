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


ADAPTER_INITS = ("zero_up", "default")


class Adapter(nn.Module):
    """Bottleneck ``Linear(D, D*ratio) -> act -> Linear(D*ratio, D)``, optionally with a skip connection.

    ``init="zero_up"`` (this project): the up-projection starts at zero, so an adapted pretrained SAM computes
    exactly what SAM computes until training moves the adapters. ``init="default"`` keeps PyTorch's default
    ``nn.Linear`` initialisation for both projections, as the paper's code (and the MSA code) does. Both draw
    the same random numbers here, so an adapter's down-projection is the same for the same seed."""

    def __init__(self, dim: int, ratio: float = 0.25, activation: str = "gelu", skip: bool = True, init: str = "zero_up"):
        super().__init__()
        if init not in ADAPTER_INITS:
            raise ValueError(f"adapter init is {init!r}; expected one of {ADAPTER_INITS}")
        hidden = int(dim * ratio)
        self.down = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(hidden, dim)
        self.skip = skip
        if init == "zero_up":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.act(self.down(x)))
        return x + y if self.skip else y


class AdaptedBlock(nn.Module):
    """segment-anything's ``Block`` with a space adapter after attention and an MLP adapter beside the MLP:

    ``x = shortcut + SpaceAdapter(attn(norm1(x)))``;  ``x = x + mlp(norm2(x)) + scale * MLPAdapter(norm2(x))``
    """

    def __init__(self, block: Block, ratio: float = 0.25, activation: str = "gelu", mlp_adapter_scale: float = 0.5,
                 init: str = "zero_up"):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size
        dim = block.norm1.normalized_shape[0]
        self.space_adapter = Adapter(dim, ratio, activation, skip=True, init=init)
        self.mlp_adapter = Adapter(dim, ratio, activation, skip=False, init=init)
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


def add_adapters(encoder: ImageEncoderViT, ratio: float = 0.25, activation: str = "gelu", init: str = "zero_up") -> ImageEncoderViT:
    """Replace every block of ``encoder`` in place by an :class:`AdaptedBlock`."""
    for i, block in enumerate(encoder.blocks):
        if not isinstance(block, AdaptedBlock):
            encoder.blocks[i] = AdaptedBlock(block, ratio, activation, init=init)
    return encoder


def is_adapter_key(key: str) -> bool:
    return any(f".{attr}." in key for attr in ADAPTER_ATTRS)
