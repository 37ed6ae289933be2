"""Segment new cases with a trained federated model.

The model is rebuilt from its :class:`ModelConfig` (the SAM checkpoint supplies the frozen parts) and the
saved travel set is loaded on top. Inputs are preprocessed with the preparers' own functions
(``fedfms.data.volumes``): RGB images / 255; NIfTI volumes windowed between their own 1st and 99th
percentiles and sliced along the last axis in voxel order (optionally as 2.5D neighbour stacks, for models
trained on sites prepared that way). Predictions are thresholded at probability 0.5 and resized back to the input
with nearest neighbour, so every output voxel lines up with an input voxel.

Outputs in ``out_dir``: ``<stem>_<class>.png`` (0/255) for an image, ``<stem>_<class>.nii.gz`` (uint8 0/1,
the input's affine) for a volume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from fedfms.data import volumes as vol
from fedfms.data.site_dataset import resize_image
from fedfms.errors import CheckpointError, ConfigError, DataError
from fedfms.models import ModelConfig, build_model, travel_keys
from fedfms.models.checkpoint import read_state_dict
from fedfms.training.trainer import pick_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A saved travel set: plain, or wrapped as ``{"model": state_dict, ...}`` (FLARE's PT persistor)."""
    return read_state_dict(path, "weights file", "a saved travel set (e.g. FL_global_model.pt)")


def load_model(model_cfg: ModelConfig | Mapping, weights_path: str | os.PathLike) -> torch.nn.Module:
    """``build_model(model_cfg)`` with the travel set from ``weights_path`` loaded on top.

    The file must hold every tensor of the mode's travel set (otherwise part of the model would stay at its
    initial values) and nothing the model lacks; every shape must match."""
    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(dict(model_cfg))
    model = build_model(cfg)
    weights = load_weights(weights_path)
    state = model.state_dict()
    missing = sorted(set(travel_keys(model, cfg.mode)) - set(weights))
    unexpected = sorted(set(weights) - set(state))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: does not match a {cfg.variant} {cfg.mode} model with {cfg.num_classes} class(es): "
            f"{len(missing)} missing key(s) {missing[:1]}, {len(unexpected)} unexpected key(s) {unexpected[:1]}"
        )
    for key, value in weights.items():
        if value.shape != state[key].shape:
            raise CheckpointError(
                f"{weights_path}: tensor '{key}' has shape {tuple(value.shape)}; expected {tuple(state[key].shape)} "
                f"(a {cfg.variant} {cfg.mode} model with {cfg.num_classes} class(es))"
            )
    model.load_state_dict(weights, strict=False)
    return model.eval()


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    raise DataError(f"{path}: unsupported input; expected an image ({', '.join(IMAGE_SUFFIXES)}) or a NIfTI volume (.nii, .nii.gz)")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]. 8-bit images / 255; 16-bit or float images windowed like a volume."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "F"):
                return np.repeat(vol.window_percentiles(np.asarray(im, dtype=np.float32))[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


@torch.no_grad()
def predict_slices(model: torch.nn.Module, slices: np.ndarray, threshold: float = 0.5, batch_size: int = 4) -> np.ndarray:
    """(N, H, W, 3) float images in [0, 1] -> (N, C, H, W) uint8 {0, 1} masks at the input size."""
    device = next(model.parameters()).device
    size = model.image_size
    out = []
    for start in range(0, len(slices), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start : start + batch_size])).permute(0, 3, 1, 2)
        logits = model(resize_image(batch, size).clamp(0, 1).to(device)).float()
        mask = (torch.sigmoid(logits) > threshold).float()
        mask = F.interpolate(mask, size=slices.shape[1:3], mode="nearest-exact")
        out.append(mask.to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def predict_cases(
    model_cfg: ModelConfig | Mapping,
    weights_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    batch_size: int = 4,
    device: str = "auto",
    two_and_half_d: bool = False,
) -> list[Path]:
    """Segment every input; returns the files written, input by input, class by class.

    ``two_and_half_d``: feed volume slices k-1, k, k+1 as the three channels, as the preparers'
    ``two_and_half_d`` setting did for the training data (it must match how the model was trained)."""
    inputs = [Path(p) for p in inputs]
    for path in inputs:
        if not path.is_file():
            raise DataError(f"{path}: input file not found")
        _kind(path)
    stems = [_stem(p) for p in inputs]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise DataError(f"two inputs share the name {dup!r}; their outputs would overwrite each other")
    model = load_model(model_cfg, weights_path).to(pick_device(device))
    names = list(class_names) if class_names else [f"class{k}" for k in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise ConfigError(f"class_names has {len(names)} name(s) {names}; the model predicts {model.num_classes} class(es)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: list[Path] = []
    for path, stem in zip(inputs, stems):
        if _kind(path) == "image":
            masks = predict_slices(model, read_image(path)[None], threshold, batch_size)[0]  # (C, H, W)
            for name, m in zip(names, masks):
                target = out_dir / f"{stem}_{name}.png"
                Image.fromarray(m * 255, "L").save(target)
                outputs.append(target)
        else:
            import nibabel as nib

            volume, _ = vol.load_nifti(path)
            windowed = vol.window_percentiles(volume)
            if two_and_half_d:
                slices = np.stack([stack for _, stack in vol.iter_slices_2p5d(windowed)])  # (D, H, W, 3)
            else:
                slices = np.repeat(np.moveaxis(windowed, -1, 0)[..., None], 3, axis=-1)
            source = nib.load(str(path))  # header only: the output keeps the input's geometry
            masks = np.moveaxis(predict_slices(model, slices, threshold, batch_size), 0, -1)  # (C, H, W, D)
            for name, m in zip(names, masks):
                target = out_dir / f"{stem}_{name}.nii.gz"
                # The input's header keeps its qform/sform codes, voxel sizes and units.
                img = nib.Nifti1Image(np.ascontiguousarray(m), source.affine, header=source.header)
                img.set_data_dtype(np.uint8)
                img.header["cal_min"], img.header["cal_max"] = 0, 1
                nib.save(img, target)
                outputs.append(target)
    return outputs
