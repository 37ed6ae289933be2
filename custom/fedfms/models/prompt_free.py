"""Prompt-free SAM: image -> multi-class mask logits, through SAM's stock decoder without points or boxes."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# SAM's pixel statistics are on the 0-255 scale; our images are in [0, 1].
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class PromptFreeSAM(nn.Module):
    """SAM with an empty prompt and a 1x1-conv head over the decoder's three multimask outputs.

    Input ``(B, 3, S, S)`` in [0, 1] (S = the encoder's image size), output ``(B, C, S/4, S/4)`` logits.
    Attribute names match ``segment_anything.modeling.Sam`` so official checkpoints load key for key.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        num_classes: int,
        normalize: bool = True,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.head = nn.Conv2d(mask_decoder.num_mask_tokens - 1, num_classes, kernel_size=1)
        self.normalize = normalize
        self.activation_checkpointing = activation_checkpointing
        # Not persistent: they are constants, never part of a checkpoint or of what travels.
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1) / 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1) / 255.0, persistent=False)

    @property
    def num_classes(self) -> int:
        return self.head.out_channels

    @property
    def image_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def mask_size(self) -> int:
        """The decoder's low-resolution masks: 4x the image embedding (256 for a 1024 input)."""
        return self.image_encoder.img_size // self.image_encoder.patch_embed.proj.stride[0] * 4

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            images = (images - self.pixel_mean) / self.pixel_std
        enc = self.image_encoder
        x = enc.patch_embed(images)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for block in enc.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return enc.neck(x.permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = self.encode(images)
        # Batch-1 empty prompt: the decoder broadcasts it over the images. Expanding it to B would make
        # the decoder's repeat_interleave produce B*B rows.
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        masks, _ = self.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        return self.head(masks)
