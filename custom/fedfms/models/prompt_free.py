"""Prompt-free SAM: image -> multi-class mask logits, through SAM's stock decoder without points or boxes."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# SAM's pixel statistics are on the 0-255 scale; our images are in [0, 1].
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


HEADS = ("multimask_conv", "reference")
DENSE_PROMPTS = ("no_mask_embed", "none")


class PromptFreeSAM(nn.Module):
    """SAM with an empty prompt and a class head on the mask decoder's outputs.

    Input ``(B, 3, S, S)`` in [0, 1] (S = the encoder's image size), output ``(B, C, S/4, S/4)`` logits.
    Attribute names match ``segment_anything.modeling.Sam`` so official checkpoints load key for key.

    ``head``: ``"multimask_conv"`` (this project) is a 1x1 ``Conv2d(3, C)`` over the decoder's three multimask
    outputs. ``"reference"`` is the paper's code: with C = 1 the single-mask output (mask token 0) is the
    logit map, no head at all; with C > 1 a 1x1 ``Conv2d(4, C)`` over all four mask-token outputs.
    ``dense_prompt``: ``"no_mask_embed"`` (this project, what SAM does without a mask prompt) adds the prompt
    encoder's learnt no-mask embedding to the image embedding; ``"none"`` adds nothing, as the paper's code's
    decoder does. ``normalize``: SAM's pixel mean/std (this project) or the [0, 1] image as it is (paper code).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        num_classes: int,
        normalize: bool = True,
        activation_checkpointing: bool = False,
        head: str = "multimask_conv",
        dense_prompt: str = "no_mask_embed",
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head is {head!r}; expected one of {HEADS}")
        if dense_prompt not in DENSE_PROMPTS:
            raise ValueError(f"dense_prompt is {dense_prompt!r}; expected one of {DENSE_PROMPTS}")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.head_type, self.dense_prompt = head, dense_prompt
        self._num_classes = num_classes
        tokens = mask_decoder.num_mask_tokens  # 4: the single-mask token, then the 3 multimask tokens
        if head == "multimask_conv":
            self.head = nn.Conv2d(tokens - 1, num_classes, kernel_size=1)
        elif num_classes > 1:
            self.head = nn.Conv2d(tokens, num_classes, kernel_size=1)
        else:
            self.head = None  # the reference head for one class: token 0's mask, nothing trained on top
        self.normalize = normalize
        self.activation_checkpointing = activation_checkpointing
        # Not persistent: they are constants, never part of a checkpoint or of what travels.
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1) / 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1) / 255.0, persistent=False)

    @property
    def num_classes(self) -> int:
        return self._num_classes

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
        if self.dense_prompt == "none":
            dense = torch.zeros_like(dense)
        # All four mask-token outputs (what MaskDecoder.forward slices: [:, 1:] for multimask, [:, :1] single)
        masks, _ = self.mask_decoder.predict_masks(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        if self.head_type == "multimask_conv":
            return self.head(masks[:, 1:])
        return masks[:, :1] if self.head is None else self.head(masks)
