"""Model flavours: this project's choices, or the paper's code's, behind one switch.

A flavour is a set of :class:`~fedfms.models.ModelConfig` and :class:`~fedfms.training.trainer.TrainConfig`
fields. ``"project"`` is what every config defaults to; ``"reference"`` reproduces what the authors' code
(LIU-YUXI/FedFMS) does where it departs from this project:

=================  ===========================================  ==========================================
field              project (default)                            reference (the paper's code)
=================  ===========================================  ==========================================
``head``           ``Conv2d(3, C)`` over the 3 multimask masks   C = 1: mask token 0, no conv;
                                                                 C > 1: ``Conv2d(4, C)`` over all 4 tokens
``normalize``      SAM's pixel mean/std                         the [0, 1] image (image / 255) straight in
``dense_prompt``   SAM's ``no_mask_embed`` added                 nothing added (their decoder skips it)
``adapter_init``   up-projections zero-initialised              PyTorch's default ``nn.Linear`` init
``adapted_block_   FedMSA: ``norm1``, then window partition     window partition, then ``norm1`` (padding
order``            (segment-anything's order)                   tokens enter attention as LayerNorm's bias)
``pos_weight``     1 (plain BCE-with-logits)                    2
=================  ===========================================  ==========================================

Both flavours have the same SAM modules under the same names, so both load the same official checkpoint
through the strict loader; only the class head (and, for FedMSA, the adapters' starting values) differ.
The block order changes no weight, only where FedMSA's windowed blocks apply ``norm1`` (models/adapters.py).
The U-Net baseline has none of the SAM fields; its flavour is the loss weight only.

This module is FLARE-free; the FLARE job layer calls :func:`flavour_overrides` to write a job's configs.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Mapping

from fedfms.errors import ConfigError

FLAVOURS: dict[str, dict[str, dict]] = {
    "project": {
        "model": {"head": "multimask_conv", "normalize": True, "dense_prompt": "no_mask_embed", "adapter_init": "zero_up",
                  "adapted_block_order": "norm_then_window"},
        "train": {"pos_weight": 1.0},
    },
    "reference": {
        "model": {"head": "reference", "normalize": False, "dense_prompt": "none", "adapter_init": "default",
                  "adapted_block_order": "window_then_norm"},
        "train": {"pos_weight": 2.0},
    },
}

SAM_ONLY_FIELDS = ("head", "normalize", "dense_prompt", "adapter_init", "adapted_block_order")  # the U-Net has none


def flavour_overrides(name: str, variant: str | None = None) -> dict[str, dict]:
    """``{"model": {...}, "train": {...}}``: the config fields that make flavour ``name``.

    Merge them into a job's (or a run's) model and train config, e.g. ``model_cfg.update(o["model"])``.
    ``variant``: for ``"unet"`` the SAM-only model fields are left out (the U-Net has no head, prompt or
    adapters to switch), so only the loss weight changes. Raises :class:`ConfigError` for an unknown name."""
    if name not in FLAVOURS:
        raise ConfigError(f"flavour is {name!r}; expected one of {', '.join(FLAVOURS)}")
    out = copy.deepcopy(FLAVOURS[name])
    if variant == "unet":
        out["model"] = {k: v for k, v in out["model"].items() if k not in SAM_ONLY_FIELDS}
    return out


def apply_flavour(name: str, model: Mapping | None = None, train: Mapping | None = None,
                  variant: str | None = None) -> tuple[dict, dict]:
    """``model`` and ``train`` overrides with flavour ``name`` merged in. A field set both by the flavour and
    by the caller to another value is refused (one switch must not be silently half-undone)."""
    model, train = dict(model or {}), dict(train or {})
    o = flavour_overrides(name, variant or model.get("variant"))
    for part, given in (("model", model), ("train", train)):
        for key, value in o[part].items():
            if key in given and given[key] != value:
                raise ConfigError(f"flavour {name!r} sets {part} field {key!r} to {value!r}, but it is also given as "
                                  f"{given[key]!r}; drop one of them")
            given[key] = value
    return model, train


def flavour_of(model: Mapping, train: Mapping) -> str:
    """Which flavour a (model, train) config pair is: ``"project"``, ``"reference"``, or ``"custom"``
    (a mix). Fields missing from the dicts take the dataclass defaults."""
    # imported here: the trainer brings in MONAI (~4 CPU-s), and `fedfms --help` only needs the flavours' names
    from fedfms.models import ModelConfig
    from fedfms.training.trainer import TrainConfig

    defaults = {"model": {f.name: f.default for f in fields(ModelConfig)},
                "train": {f.name: f.default for f in fields(TrainConfig)}}
    given = {"model": dict(model or {}), "train": dict(train or {})}
    variant = given["model"].get("variant", defaults["model"]["variant"])
    for name in FLAVOURS:
        o = flavour_overrides(name, variant)
        if all(_same(given[part].get(k, defaults[part][k]), v) for part in ("model", "train") for k, v in o[part].items()):
            return name
    return "custom"


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b
