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

# Where norm1 sits relative to the window partition of a windowed-attention block. They differ only when the
# token grid does not divide into whole windows (1024 px: 64x64 tokens, windows of 14, padded to 70x70):
# "norm_then_window" (segment-anything's Block) pads the normalised grid with zeros; "window_then_norm" (the
# paper code's MSA block) pads first, so its padding tokens pass through LayerNorm and enter attention as
# the LayerNorm bias (zero only in a randomly initialised model, non-zero in every official SAM checkpoint).
BLOCK_ORDERS = ("norm_then_window", "window_then_norm")


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

    ``order``: where ``norm1`` sits relative to the window partition (:data:`BLOCK_ORDERS`).
    """

    def __init__(self, block: Block, ratio: float = 0.25, activation: str = "gelu", mlp_adapter_scale: float = 0.5,
                 init: str = "zero_up", order: str = "norm_then_window"):
        super().__init__()
        if order not in BLOCK_ORDERS:
            raise ValueError(f"adapted block order is {order!r}; expected one of {BLOCK_ORDERS}")
        self.order = order
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size
        dim = block.norm1.normalized_shape[0]
        self.space_adapter = Adapter(dim, ratio, activation, skip=True, init=init)
        self.mlp_adapter = Adapter(dim, ratio, activation, skip=False, init=init)
        self.mlp_adapter_scale = mlp_adapter_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        norm_first = self.order == "norm_then_window"
        if norm_first:
            x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        if not norm_first:
            x = self.norm1(x)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (height, width))
        x = shortcut + self.space_adapter(x)
        xn = self.norm2(x)
        return x + self.mlp(xn) + self.mlp_adapter_scale * self.mlp_adapter(xn)


def add_adapters(encoder: ImageEncoderViT, ratio: float = 0.25, activation: str = "gelu", init: str = "zero_up",
                 order: str = "norm_then_window") -> ImageEncoderViT:
    """Replace every block of ``encoder`` in place by an :class:`AdaptedBlock`."""
    for i, block in enumerate(encoder.blocks):
        if not isinstance(block, AdaptedBlock):
            encoder.blocks[i] = AdaptedBlock(block, ratio, activation, init=init, order=order)
    return encoder


def is_adapter_key(key: str) -> bool:
    return any(f".{attr}." in key for attr in ADAPTER_ATTRS)
