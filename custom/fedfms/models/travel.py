"""The one place that decides which tensors are trained and which leave a site ("travel").

FedSAM: everything (the whole state dict) is trained and travels.
FedMSA: the encoder is frozen; only the adapters, the mask decoder and the class head train and travel.
The FLARE result filter, the server-side validator, the persistor and the benchmarks all ask this module.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from torch import nn

from fedfms.errors import ConfigError
from fedfms.models.adapters import is_adapter_key

MODES = ("fedsam", "fedmsa")
_MSA_TRAINED_PREFIXES = ("mask_decoder.", "head.")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"mode is {mode!r}; expected one of {MODES}")
    return mode


def is_travel_key(key: str, mode: str) -> bool:
    check_mode(mode)
    if mode == "fedsam":
        return True
    return key.startswith(_MSA_TRAINED_PREFIXES) or (key.startswith("image_encoder.") and is_adapter_key(key))


def travel_keys(model: nn.Module, mode: str) -> list[str]:
    return [k for k in model.state_dict() if is_travel_key(k, mode)]


def travel_state_dict(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the tensors that leave a site."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if is_travel_key(k, mode)}


def set_trainable(model: nn.Module, mode: str) -> nn.Module:
    for name, param in model.named_parameters():
        param.requires_grad_(is_travel_key(name, mode))
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def travel_spec(model: nn.Module, mode: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of what travels: what a receiver validates updates against."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if is_travel_key(k, mode)}


def travel_bytes(spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]], bytes_per_value: int | None = None) -> int:
    total = 0
    for shape, dtype in spec.values():
        n = 1
        for d in shape:
            n *= d
        total += n * (bytes_per_value or torch.empty((), dtype=dtype).element_size())
    return total


def frozen_fingerprint(model: nn.Module, mode: str) -> str:
    """SHA-256 over every tensor that does *not* travel (FedMSA: the frozen encoder and prompt encoder).

    Averaged adapters are only meaningful on identical frozen weights, so sites report this and the server
    refuses a site whose frozen weights differ (another checkpoint file, another init seed)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if not is_travel_key(key, mode):
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
