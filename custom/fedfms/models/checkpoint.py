"""Strict loading of the official SAM checkpoints (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ...).

Every key and shape is checked against the variant the user asked for. The only tensors allowed to differ
in shape are the position tables when the model runs at another input size than the checkpoint's 1024:
``pos_embed`` is resized bicubically and the global blocks' relative-position tables linearly (the same
interpolation segment-anything applies at run time).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from fedfms.errors import CheckpointError
from fedfms.models.registry import VARIANTS

SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def read_state_dict(
    path: str | os.PathLike, what: str = "checkpoint", expected: str = "a SAM checkpoint such as sam_vit_b_01ec64.pth"
) -> dict[str, torch.Tensor]:
    """A saved state dict, plain or wrapped as ``{"model": ...}`` (FLARE's PT persistor), loaded without
    unpickling arbitrary objects. Errors name the file and say what was expected."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found; expected {expected}")
    try:
        try:
            # memory-mapped: the tensors are read from the file's pages as the model copies them, instead of a
            # second full copy in RAM (every simulated site process loads the checkpoint)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        size = path.stat().st_size
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Weights only load failed" in detail:  # PyTorch's paragraph about weights_only says no more than this
            detail = "not a plain tensor file: objects other than tensors are never unpickled, for safety"
        raise CheckpointError(
            f"{path}: unreadable {what} ({size} bytes; truncated or not a PyTorch file: {detail[:120]})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors; expected {expected}")
    return obj


def describe_variant(state: dict[str, torch.Tensor]) -> str:
    """A human guess of which SAM a state dict is, e.g. ``vit_l (embed 1024, 24 blocks)``."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return "not a SAM checkpoint (no image_encoder.patch_embed.proj.weight)"
    embed = patch.shape[0]
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    names = [v.name for v in VARIANTS.values() if v.embed_dim == embed and v.depth == depth]
    return f"{names[0] if names else 'an unknown variant'} (embed {embed}, {depth} blocks)"


def _resize_pos_embed(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    x = t.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(shape[1], shape[2]), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).to(t.dtype)


def _resize_rel_pos(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    x = F.interpolate(t.float().t()[None], size=shape[0], mode="linear", align_corners=False)
    return x[0].t().to(t.dtype)


def load_sam_weights(model: torch.nn.Module, path: str | os.PathLike, variant_name: str) -> list[str]:
    """Load SAM's image encoder, prompt encoder and mask decoder from ``path`` into ``model``.

    Returns the keys that were resized for a different input size. Raises CheckpointError for a missing,
    unreadable or truncated file, or one whose keys or shapes do not match ``variant_name``."""
    state = read_state_dict(path)
    expected = {k: v for k, v in model.state_dict().items()
                if k.startswith(SAM_PREFIXES) and ".space_adapter." not in k and ".mlp_adapter." not in k}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in state if k not in expected)
    wrong_variant = f"; the file looks like {describe_variant(state)}, expected {variant_name}"
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing key(s) e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
        raise CheckpointError(f"{path}: {', '.join(detail)}{wrong_variant}")
    resized, loaded = [], {}
    for key, target in expected.items():
        tensor = state[key]
        if tensor.shape != target.shape:
            if key == "image_encoder.pos_embed" and tensor.dim() == 4 and tensor.shape[-1] == target.shape[-1]:
                tensor = _resize_pos_embed(tensor, target.shape)
            elif key.endswith((".rel_pos_h", ".rel_pos_w")) and tensor.shape[1] == target.shape[1]:
                tensor = _resize_rel_pos(tensor, target.shape)
            else:
                raise CheckpointError(
                    f"{path}: tensor '{key}' has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}{wrong_variant}"
                )
            resized.append(key)
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor '{key}' has NaN/inf values; the file is corrupt")
        loaded[key] = tensor
    result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return resized
