"""SAM variants, built from segment-anything's own modules.

The official variants copy the hyper-parameters of ``segment_anything.build_sam``; ``tiny`` keeps every
architectural feature (windowed + global attention, relative positions, the real TwoWayTransformer and
MaskDecoder) at a size that trains in milliseconds on a CPU, for tests and the offline demo.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from fedfms.errors import ConfigError


@dataclass(frozen=True)
class SamVariant:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    checkpoint_name: str | None = None

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mask_size(self) -> int:
        """The decoder's low-resolution mask side: 4x the image embedding."""
        return self.embedding_size * 4

    def with_image_size(self, image_size: int) -> "SamVariant":
        if image_size % self.patch_size:
            raise ConfigError(f"image_size {image_size} must be a multiple of the patch size {self.patch_size}")
        return replace(self, image_size=image_size)


VARIANTS: dict[str, SamVariant] = {
    "vit_b": SamVariant("vit_b", 768, 12, 12, (2, 5, 8, 11), checkpoint_name="sam_vit_b_01ec64.pth"),
    "vit_l": SamVariant("vit_l", 1024, 24, 16, (5, 11, 17, 23), checkpoint_name="sam_vit_l_0b3195.pth"),
    "vit_h": SamVariant("vit_h", 1280, 32, 16, (7, 15, 23, 31), checkpoint_name="sam_vit_h_4b8939.pth"),
    "tiny": SamVariant(
        "tiny", 64, 2, 2, (1,), image_size=128, window_size=5, prompt_dim=32, mask_in_chans=4,
        decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32,
    ),
}


def get_variant(name: str, image_size: int | None = None) -> SamVariant:
    if name not in VARIANTS:
        raise ConfigError(f"model variant is {name!r}; expected one of {sorted(VARIANTS)}")
    variant = VARIANTS[name]
    return variant.with_image_size(image_size) if image_size else variant


def build_image_encoder(v: SamVariant) -> ImageEncoderViT:
    return ImageEncoderViT(
        depth=v.depth,
        embed_dim=v.embed_dim,
        img_size=v.image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=v.num_heads,
        patch_size=v.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=v.global_attn_indexes,
        window_size=v.window_size,
        out_chans=v.prompt_dim,
    )


def build_prompt_encoder(v: SamVariant) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=v.prompt_dim,
        image_embedding_size=(v.embedding_size, v.embedding_size),
        input_image_size=(v.image_size, v.image_size),
        mask_in_chans=v.mask_in_chans,
    )


def build_mask_decoder(v: SamVariant) -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=v.decoder_depth, embedding_dim=v.prompt_dim, mlp_dim=v.decoder_mlp_dim, num_heads=v.decoder_heads
        ),
        transformer_dim=v.prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=v.iou_head_hidden_dim,
    )
