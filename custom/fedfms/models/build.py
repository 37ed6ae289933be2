"""Build a FedSAM or FedMSA model from a :class:`ModelConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedfms.config import from_mapping
from fedfms.errors import ConfigError
from fedfms.models.adapters import ADAPTER_INITS, BLOCK_ORDERS, add_adapters
from fedfms.models.attention import use_fused_attention
from fedfms.models.checkpoint import load_sam_weights
from fedfms.models.prompt_free import DENSE_PROMPTS, HEADS, PromptFreeSAM
from fedfms.models.registry import build_image_encoder, build_mask_decoder, build_prompt_encoder, get_variant
from fedfms.models.travel import check_local_parts, check_mode, local_keys, set_trainable
from fedfms.models.unet import UNetSegmenter


UNET = "unet"  # the FedU-Net baseline (MONAI BasicUNet), trained from scratch


@dataclass
class ModelConfig:
    variant: str = "vit_b"  # vit_b, vit_l, vit_h, tiny (SAM) or unet (baseline)
    mode: str = "fedmsa"  # "fedsam": train everything; "fedmsa": frozen encoder + adapters + decoder
    num_classes: int = 1
    image_size: int | None = None  # None: the variant's native size (1024 for SAM)
    checkpoint: str | None = None  # official SAM .pth; required when pretrained
    pretrained: bool = True  # False: the paper's -PT ablation (random init)
    init_seed: int = 0  # every site must build the same random init (frozen encoder of FedMSA -PT)
    normalize: bool = True  # SAM's pixel mean/std; False: the [0, 1] image straight in (the paper's code)
    head: str = "multimask_conv"  # Conv2d(3, C) over the multimask outputs; "reference": the paper code's head
    dense_prompt: str = "no_mask_embed"  # SAM's no-mask embedding; "none": nothing added (the paper's code)
    adapter_ratio: float = 0.25
    adapter_activation: str = "gelu"  # the MSA code uses GELU; the paper's text says ReLU
    adapter_init: str = "zero_up"  # up-projections start at zero; "default": PyTorch's init (the paper's code)
    # FedMSA's blocks: norm1 before the window partition (segment-anything); "window_then_norm": after it (the
    # paper's code: padding tokens become the LayerNorm bias); models/adapters.py BLOCK_ORDERS
    adapted_block_order: str = "norm_then_window"
    activation_checkpointing: bool = False
    fused_attention: bool = True  # same numbers as SAM's attention, far less memory (models/attention.py)
    # what each site keeps of the trained model, never sent: some of "norm", "head", "decoder" (models/travel.py);
    # set by a job's `personalise` setting (fedfms.training.personal)
    local_parts: tuple = ()

    def __post_init__(self):
        self.local_parts = check_local_parts(self.local_parts)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model config") -> "ModelConfig":
        return from_mapping(cls, d, where)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mask_size(self) -> int:
        if self.variant == UNET:
            return (self.image_size or 1024) // 4
        return get_variant(self.variant, self.image_size).mask_size


def build_unet(cfg: ModelConfig) -> UNetSegmenter:
    if cfg.mode != "fedsam":
        raise ConfigError(f"model config: the unet baseline has no adapters; mode must be 'fedsam' (train everything), got {cfg.mode!r}")
    if cfg.pretrained:
        raise ConfigError("model config: the unet baseline has no pretrained checkpoint; set pretrained: false")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = UNetSegmenter(cfg.num_classes, cfg.image_size or 1024)
    return _checked_local_parts(set_trainable(model, cfg.mode), cfg)


def _checked_local_parts(model, cfg: ModelConfig):
    local_keys(model, cfg.mode, cfg.local_parts)  # a local part the model lacks, or one holding everything: ConfigError
    return model


def build_model(cfg: ModelConfig) -> PromptFreeSAM | UNetSegmenter:
    check_mode(cfg.mode)
    if cfg.num_classes < 1:
        raise ConfigError(f"num_classes is {cfg.num_classes}; expected >= 1")
    if cfg.variant == UNET:
        return build_unet(cfg)
    if cfg.adapter_activation not in ("gelu", "relu"):
        raise ConfigError(f"adapter_activation is {cfg.adapter_activation!r}; expected 'gelu' or 'relu'")
    for field, value, allowed in (("head", cfg.head, HEADS), ("dense_prompt", cfg.dense_prompt, DENSE_PROMPTS),
                                  ("adapter_init", cfg.adapter_init, ADAPTER_INITS),
                                  ("adapted_block_order", cfg.adapted_block_order, BLOCK_ORDERS)):
        if value not in allowed:
            raise ConfigError(f"model config: {field} is {value!r}; expected one of {', '.join(allowed)}")
    variant = get_variant(cfg.variant, cfg.image_size)
    if cfg.pretrained and not cfg.checkpoint:
        hint = f" (e.g. {variant.checkpoint_name})" if variant.checkpoint_name else ""
        raise ConfigError(
            f"model config: 'checkpoint' is empty; expected the path of the official SAM {cfg.variant} checkpoint{hint}, "
            "or pretrained=false for random initialisation"
        )
    # A private, seeded RNG stream: identical weights at every site, whatever happened before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = PromptFreeSAM(
            build_image_encoder(variant),
            build_prompt_encoder(variant),
            build_mask_decoder(variant),
            num_classes=cfg.num_classes,
            normalize=cfg.normalize,
            activation_checkpointing=cfg.activation_checkpointing,
            head=cfg.head,
            dense_prompt=cfg.dense_prompt,
        )
        if cfg.mode == "fedmsa":
            add_adapters(model.image_encoder, cfg.adapter_ratio, cfg.adapter_activation, cfg.adapter_init,
                         cfg.adapted_block_order)
        if cfg.fused_attention:
            use_fused_attention(model.image_encoder)
    if cfg.pretrained:
        load_sam_weights(model, Path(cfg.checkpoint).expanduser(), cfg.variant)
    return _checked_local_parts(set_trainable(model, cfg.mode), cfg)


def build_model_on_meta(cfg: ModelConfig) -> PromptFreeSAM:
    """Structure only (no memory, no checkpoint): for counting parameters and sizing messages."""
    with torch.device("meta"):
        return build_model(ModelConfig(**{**cfg.to_dict(), "pretrained": False}))
