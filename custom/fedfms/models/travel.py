"""The one place that decides which tensors are trained, which leave a site ("travel") and which stay there.

FedSAM: everything (the whole state dict) is trained and travels.
FedMSA: the encoder is frozen; only the adapters, the mask decoder and the class head train and travel.
A personalised job (``ModelConfig.local_parts``) keeps part of what trains at each site, never sent, never
averaged: ``norm`` (FedBN: every normalisation layer that trains), ``head`` (FedPer: the class head) or ``decoder``
(FedMSA's personalised variant: the whole mask decoder with its head). What travels is then the trained tensors
minus that local part.
The FLARE result filter, the server-side validator, the persistor and the benchmarks all ask this module.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from fedfms.errors import ConfigError
from fedfms.models.adapters import is_adapter_key

MODES = ("fedsam", "fedmsa")
_MSA_TRAINED_PREFIXES = ("mask_decoder.", "head.")

# the parts a personalised job may keep at each site (fedfms.models.ModelConfig.local_parts)
LOCAL_PARTS = ("norm", "head", "decoder")
NORM_LAYERS = (nn.LayerNorm, LayerNorm2d, nn.GroupNorm, nn.modules.batchnorm._NormBase)  # _NormBase: batch and instance norms
_HEAD_PREFIXES = ("head.", "unet.final_conv.")  # the prompt-free SAM's class head; the U-Net's last convolution
_DECODER_PREFIXES = ("mask_decoder.", "head.")  # the mask decoder and the class head on its outputs


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"mode is {mode!r}; expected one of {MODES}")
    return mode


def is_travel_key(key: str, mode: str) -> bool:
    """Whether ``key`` trains in ``mode``; it travels too unless the job keeps it in a site's local part
    (:func:`local_keys`). The frozen rest (FedMSA's encoder) never travels."""
    check_mode(mode)
    if mode == "fedsam":
        return True
    return key.startswith(_MSA_TRAINED_PREFIXES) or (key.startswith("image_encoder.") and is_adapter_key(key))


def check_local_parts(parts, where: str = "model config") -> tuple[str, ...]:
    """The local parts in their canonical order (``decoder`` already holds the head)."""
    if isinstance(parts, str) or not isinstance(parts, (list, tuple)):
        raise ConfigError(f"{where}: local_parts is {parts!r}; expected a list of some of {', '.join(LOCAL_PARTS)}")
    unknown = [p for p in parts if p not in LOCAL_PARTS]
    if unknown:
        raise ConfigError(f"{where}: local_parts {list(parts)} has {unknown}; expected some of {', '.join(LOCAL_PARTS)}")
    chosen = [p for p in LOCAL_PARTS if p in parts]
    if "decoder" in chosen and "head" in chosen:
        chosen.remove("head")
    return tuple(chosen)


def norm_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every normalisation layer (weights, biases and running statistics)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            keys |= {f"{name}.{k}" if name else k for k in module.state_dict()}
    return keys


def local_keys(model: nn.Module, mode: str, local_parts=()) -> list[str]:
    """The trained tensors that stay at each site in a job that keeps ``local_parts`` there (empty: none).
    Only what trains can be local: FedMSA's frozen encoder norms stay frozen (and in the fingerprint)."""
    parts = check_local_parts(local_parts)
    if not parts:
        return []
    state = model.state_dict()
    norms = norm_keys(model) if "norm" in parts else set()
    found = []
    for key in state:
        if not is_travel_key(key, mode):
            continue
        if (key in norms or ("head" in parts and key.startswith(_HEAD_PREFIXES))
                or ("decoder" in parts and key.startswith(_DECODER_PREFIXES))):
            found.append(key)
    missing = [p for p in parts if not _part_present(p, found, norms)]
    if missing:
        raise ConfigError(f"model config: local_parts {list(parts)}: this {type(model).__name__} ({mode}) has no trained "
                          f"{' or '.join(missing)} to keep at the sites")
    if len(found) == sum(1 for k in state if is_travel_key(k, mode)):
        raise ConfigError(f"model config: local_parts {list(parts)} keep every trained tensor of this {mode} model at the "
                          "sites: nothing would be federated")
    return found


def _part_present(part: str, found: list[str], norms: set[str]) -> bool:
    if part == "norm":
        return any(k in norms for k in found)
    prefixes = _HEAD_PREFIXES if part == "head" else ("mask_decoder.",)
    return any(k.startswith(prefixes) for k in found)


def travel_keys(model: nn.Module, mode: str, local_parts=()) -> list[str]:
    local = set(local_keys(model, mode, local_parts))
    return [k for k in model.state_dict() if is_travel_key(k, mode) and k not in local]


def trained_keys(model: nn.Module, mode: str) -> list[str]:
    """Everything that trains at a site: what travels plus any local part (a site's whole personal model)."""
    return [k for k in model.state_dict() if is_travel_key(k, mode)]


def travel_state_dict(model: nn.Module, mode: str, local_parts=()) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the tensors that leave a site."""
    keys = set(travel_keys(model, mode, local_parts))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keys}


def local_state_dict(model: nn.Module, mode: str, local_parts=()) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the site's local part (what never leaves it)."""
    keys = set(local_keys(model, mode, local_parts))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keys}


def set_trainable(model: nn.Module, mode: str) -> nn.Module:
    for name, param in model.named_parameters():
        param.requires_grad_(is_travel_key(name, mode))
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def travel_spec(model: nn.Module, mode: str, local_parts=()) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of what travels: what a receiver validates updates against."""
    keys = set(travel_keys(model, mode, local_parts))
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if k in keys}


def local_spec(model: nn.Module, mode: str, local_parts=()) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of the local part."""
    keys = set(local_keys(model, mode, local_parts))
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if k in keys}


def travel_bytes(spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]], bytes_per_value: int | None = None) -> int:
    total = 0
    for shape, dtype in spec.values():
        n = 1
        for d in shape:
            n *= d
        total += n * (bytes_per_value or torch.empty((), dtype=dtype).element_size())
    return total


def frozen_fingerprint(model: nn.Module, mode: str) -> str:
    """SHA-256 over every tensor that does *not* train (FedMSA: the frozen encoder and prompt encoder; a local part
    trains, so it is not in it).

    Averaged adapters are only meaningful on identical frozen weights, so sites report this and the server
    refuses a site whose frozen weights differ (another checkpoint file, another init seed)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if not is_travel_key(key, mode):
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
