"""Segment new cases with a trained federated model.

The model is rebuilt from its :class:`ModelConfig` (the SAM checkpoint supplies the frozen parts) and the
saved travel set is loaded on top. Inputs are preprocessed with the preparers' own functions: 8-bit images
(PNG, JPEG, BMP, TIFF) / 255, 16-bit and float images (TIFF, PNG) windowed between their own 1st and 99th
percentiles; NIfTI volumes windowed the same way per volume and sliced along the last axis in voxel order
(optionally as 2.5D neighbour stacks, for models trained on sites prepared that way). Each image or slice becomes
the model's square input as the training data did (``resize``, :mod:`fedfms.data.geometry`): by default its aspect
ratio kept and the rest padded, as SAM does.

Back to the input's shape as SAM's ``Sam.postprocess_masks`` goes: the mask-size logits are upsampled bilinearly
to the square input, the padding is cropped off, and the rest is upsampled bilinearly to the input's own size;
only then is the probability thresholded (0.5). Edges follow the interpolated logits instead of stepping in
blocks of input/mask-size pixels, and every output pixel or voxel lines up with an input one.

Outputs in ``out_dir``: ``<stem>_<class>.png`` (0/255) for an image, ``<stem>_<class>.nii.gz`` (uint8 0/1,
the input's affine) for a volume; with ``probabilities``, also the soft maps ``<stem>_<class>_prob.tif`` (float32
in [0, 1]) or ``<stem>_<class>_prob.nii.gz`` (float32). All or nothing: every input is checked before anything is
written (a constant image or volume, a mask or segmentation passed as an input, an unreadable file), existing
outputs are never replaced without ``overwrite``, and the outputs appear only once all of them are done.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from fedfms.data import intensity
from fedfms.data import volumes as vol
from fedfms.data.geometry import PAD, check_resize, fit_image, restore_logits
from fedfms.data.preparers.common import TIFF_EXTS, read_pixels, to_rgb
from fedfms.errors import CheckpointError, ConfigError, DataError
from fedfms.models import ModelConfig, build_model, local_keys, trained_keys, travel_keys
from fedfms.models.checkpoint import read_state_dict
from fedfms.training.trainer import autocast_for, pick_device
from fedfms.config import missing_folders
from fedfms.overlays import montage, overlay
from fedfms.progress import bar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", *TIFF_EXTS)
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A saved travel set: plain, or wrapped as ``{"model": state_dict, ...}`` (FLARE's PT persistor)."""
    return read_state_dict(path, "weights file", "a saved travel set (e.g. FL_global_model.pt)")


def load_model(model_cfg: ModelConfig | Mapping, weights_path: str | os.PathLike, initial_local: bool = False) -> torch.nn.Module:
    """``build_model(model_cfg)`` with the travel set from ``weights_path`` loaded on top.

    The file must hold every tensor the model trains (otherwise part of the model would stay at its initial
    values) and nothing the model lacks; every shape must match. For a personalised model (``local_parts``) that
    is a site's model (``fedfms_personal/*.pt`` in the site's run folder): the server's global model holds the
    shared part only. ``initial_local``: accept a file without the local part and keep the model's initial local
    part instead (how a site that never joined uses the global model: ``fedfms.evaluation.personal.held_out_model``)."""
    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(dict(model_cfg))
    model = build_model(cfg)
    weights = load_weights(weights_path)
    state = model.state_dict()
    required = travel_keys(model, cfg.mode, cfg.local_parts) if initial_local else trained_keys(model, cfg.mode)
    missing = sorted(set(required) - set(weights))
    local = set(local_keys(model, cfg.mode, cfg.local_parts))
    if missing and set(missing) <= local:
        raise CheckpointError(
            f"{weights_path}: holds the shared part of a personalised model only; the job keeps its "
            f"{', '.join(cfg.local_parts)} at each site ({len(missing)} tensor(s), e.g. {missing[:1]}). Pass a site's model "
            "from fedfms_personal/ in that site's run folder: global_model.pt (the global model with the site's local "
            "part) or personal_model.pt (its personalised model)"
        )
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


def read_image(path: Path, allow_label_like: bool = False) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]. 8-bit images / 255; 16-bit or float images (PNG, TIFF) windowed like a volume
    (their own 1st..99th percentile -> [0, 1]). A constant image, or one that looks like a mask (a handful of
    whole-number values; unless ``allow_label_like``), is refused with a DataError naming the file."""
    arr, _ = read_pixels(path)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise DataError(f"{path}: image has NaN/inf values; expected finite intensities")
    intensity.check_content(arr, str(path), "image", allow_label_like)
    if arr.dtype == np.uint8:
        return to_rgb(arr).astype(np.float32) / 255.0
    return to_rgb(intensity.window(arr, where=str(path)))


def read_volume_slices(path: Path, two_and_half_d: bool = False, allow_label_like: bool = False) -> np.ndarray:
    """A NIfTI volume as (D, H, W, 3) float32 model inputs: windowed between its own 1st and 99th percentile,
    sliced along the last axis (2.5D: slices k-1, k, k+1 as channels). Constant volumes, volumes whose window
    is empty and (unless ``allow_label_like``) label maps are refused naming the file."""
    volume, _ = vol.load_nifti(path)
    intensity.check_content(volume, str(path), "volume", allow_label_like)
    windowed = intensity.window(volume, where=str(path), what="volume")
    if two_and_half_d:
        return np.stack([stack for _, stack in vol.iter_slices_2p5d(windowed)])
    return np.repeat(np.moveaxis(windowed, -1, 0)[..., None], 3, axis=-1)


def _read_input(path: Path, two_and_half_d: bool, allow_label_like: bool) -> np.ndarray:
    if _kind(path) == "image":
        return read_image(path, allow_label_like)[None]
    return read_volume_slices(path, two_and_half_d, allow_label_like)


PREDICT_BATCH = 8  # slices per forward pass: fills a GPU at 1024 px (bf16, no gradients) and costs nothing on a CPU


def inference_autocast(device: torch.device, amp: str = "auto"):
    """bf16 autocast on CUDA ("auto" or "bf16"); full precision on CPU ("auto") or when ``amp`` is "off"."""
    if amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"amp is {amp!r}; expected 'auto', 'bf16' or 'off'")
    return autocast_for(device, amp)


def batched_logits(model: torch.nn.Module, slices, batch_size: int = PREDICT_BATCH, amp: str = "auto",
                   resize: str = PAD):
    """Yield float32 logits (B, C, h, w) at the model's mask size, ``batch_size`` slices per forward pass.

    ``slices``: (N, H, W, 3) float images in [0, 1], or a list of (H, W, 3) images of any sizes (the files of a
    folder), each made the model's square input on the way (``resize``: ``pad`` keeps their aspect ratio,
    ``stretch`` does not; :mod:`fedfms.data.geometry`). On a CPU (amp "auto") every slice's logits equal those of
    a pass of its own (within float rounding)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size is {batch_size}; expected a positive number of slices per forward pass")
    check_resize(resize)
    device = next(model.parameters()).device
    size = model.image_size
    for start in range(0, len(slices), batch_size):
        chunk = slices[start : start + batch_size]
        if isinstance(chunk, np.ndarray):
            batch = fit_image(torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2), size, resize)
        else:
            batch = torch.stack([fit_image(torch.from_numpy(np.ascontiguousarray(s)).permute(2, 0, 1), size, resize)
                                 for s in chunk])
        with torch.no_grad(), inference_autocast(device, amp):
            logits = model(batch.clamp(0, 1).to(device))
        yield logits.float()


@torch.no_grad()
def batched_probabilities(model: torch.nn.Module, slices, batch_size: int = PREDICT_BATCH, amp: str = "auto",
                          resize: str = PAD):
    """Yield float32 probabilities at each slice's own size, a batch at a time: the logits taken back as SAM's
    ``postprocess_masks`` does (:func:`fedfms.data.geometry.restore_logits`), then the sigmoid. ``slices`` as
    :func:`batched_logits`: for an (N, H, W, 3) array each batch is (B, C, H, W); for a list of images, a list of
    (C, H, W)."""
    start = 0
    for logits in batched_logits(model, slices, batch_size, amp, resize):
        logits = logits.cpu()
        if isinstance(slices, np.ndarray):
            yield torch.sigmoid(restore_logits(logits, slices.shape[1:3], model.image_size, resize)).numpy()
        else:
            yield [torch.sigmoid(restore_logits(logits[i : i + 1], slices[start + i].shape[:2], model.image_size,
                                                resize))[0].numpy() for i in range(len(logits))]
        start += len(logits)


@torch.no_grad()
def predict_slices(model: torch.nn.Module, slices: np.ndarray, threshold: float = 0.5, batch_size: int = PREDICT_BATCH,
                   amp: str = "auto", resize: str = PAD) -> np.ndarray:
    """(N, H, W, 3) float images in [0, 1] -> (N, C, H, W) uint8 {0, 1} masks at the input size, thresholded after
    the logits were interpolated to that size (:func:`batched_probabilities`).

    ``batch_size`` slices go through the model at once; ``amp`` "auto": bf16 autocast on CUDA, fp32 on CPU."""
    out = [(p > threshold).astype(np.uint8) for p in batched_probabilities(model, slices, batch_size, amp, resize)]
    return np.concatenate(out)


def _output_names(path: Path, stem: str, names: Sequence[str], overlay: bool = False,
                  probabilities: bool = False) -> list[str]:
    """Masks per class, then (when asked) overlay pictures per class, then probability maps per class."""
    image = _kind(path) == "image"
    masks = [f"{stem}_{name}{'.png' if image else '.nii.gz'}" for name in names]
    pictures = [f"{stem}_{name}_overlay.png" for name in names] if overlay else []
    soft = [f"{stem}_{name}_prob{'.tif' if image else '.nii.gz'}" for name in names] if probabilities else []
    return masks + pictures + soft


OVERLAY_SLICES = 6  # slices a volume's overlay picture shows


def _overlay_picture(slices: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The input with one class's prediction drawn on it (fedfms.overlays: red fill and outline). A volume shows
    up to OVERLAY_SLICES slices side by side, evenly spaced among those with a prediction (or all slices)."""
    if len(slices) == 1:
        return overlay(slices[0], masks[0])
    candidates = [k for k in range(len(slices)) if masks[k].any()] or list(range(len(slices)))
    picks = sorted({candidates[int(round(j))] for j in np.linspace(0, len(candidates) - 1, min(OVERLAY_SLICES, len(candidates)))})
    return montage([overlay(slices[k], masks[k]) for k in picks], columns=len(picks))



def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder stands for the images and NIfTI volumes directly inside it (sorted by name; hidden
    files and other files are left out, and a line on stderr says how many of the latter there were)."""
    import sys

    files: list[Path] = []
    for item in (Path(p) for p in inputs):
        if not item.is_dir():
            files.append(item)
            continue
        found = sorted(p for p in item.iterdir() if p.is_file() and not p.name.startswith("."))
        usable = [p for p in found if p.name.lower().endswith(IMAGE_SUFFIXES + NIFTI_SUFFIXES)]
        if not usable:
            raise DataError(f"{item}: is a folder with no image ({', '.join(IMAGE_SUFFIXES)}) or NIfTI (.nii, .nii.gz) "
                            f"file in it; expected a folder of inputs or input files")
        other = [p.name for p in found if p not in usable]
        if other:
            print(f"note: {item}: {len(other)} file(s) that are not images or NIfTI volumes left out "
                  f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''})", file=sys.stderr, flush=True)
        files += usable
    return files


def predict_cases(
    model_cfg: ModelConfig | Mapping,
    weights_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    batch_size: int = PREDICT_BATCH,
    device: str = "auto",
    two_and_half_d: bool = False,
    overwrite: bool = False,
    allow_label_like: bool = False,
    overlay: bool = False,
    probabilities: bool = False,
    resize: str = PAD,
    progress: bool | None = None,
) -> list[Path]:
    """Segment every input (files, or folders of them: :func:`expand_inputs`); returns the files written, input by
    input: masks class by class, then overlays, then probability maps. 2D images go through the model
    ``batch_size`` files at a time (whatever their sizes), a volume ``batch_size`` slices at a time.

    All or nothing: every input is read and checked (readable, not constant, not a label map unless
    ``allow_label_like``) and every output name is checked (no clash, nothing existing replaced unless
    ``overwrite``) before the model is loaded; predictions are written to a hidden staging folder inside
    ``out_dir`` and moved into place only when all of them are done. Any failure raises DataError (or
    CheckpointError / ConfigError) and leaves ``out_dir`` as it was.

    ``two_and_half_d``: feed volume slices k-1, k, k+1 as the three channels, as the preparers'
    ``two_and_half_d`` setting did for the training data (it must match how the model was trained).
    ``resize``: how inputs become the model's square, as the training sites' manifests say (``pad``, the default
    since the aspect ratio is kept; ``stretch`` for sites prepared with ``--preset reference`` or before).

    ``overlay``: also ``<stem>_<class>_overlay.png`` per input and class, the picture ``fedfms report`` draws: the
    input with the prediction as a red fill and outline (a volume: a few slices side by side).
    ``probabilities``: also the soft map of every class (float32 in [0, 1], before the threshold).
    ``progress``: a bar over the files (None: only on a terminal)."""
    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(dict(model_cfg))
    check_resize(resize)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size is {batch_size!r}; expected a positive number of slices per forward pass")
    if not inputs:
        raise DataError("no inputs given; expected image (.png, .jpg, .tif) or NIfTI (.nii, .nii.gz) files, or a folder of them")
    inputs = expand_inputs(inputs)
    for path in inputs:
        if not path.is_file():
            raise DataError(f"{path}: input file not found")
        _kind(path)
    stems = [_stem(p) for p in inputs]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise DataError(f"two inputs share the name {dup!r}; their outputs would overwrite each other")
    names = list(class_names) if class_names else [f"class{k}" for k in range(cfg.num_classes)]
    if len(names) != cfg.num_classes:
        raise ConfigError(f"class_names has {len(names)} name(s) {names}; the model predicts {cfg.num_classes} class(es)")
    if len(set(names)) != len(names) or any(not n or "/" in n or os.sep in n for n in names):
        raise ConfigError(f"class_names {names}: expected distinct, non-empty names without '/' (they become file names)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: output is a file; expected a folder for the predictions (the file is left alone)")
    planned = [[out_dir / n for n in _output_names(p, s, names, overlay, probabilities)] for p, s in zip(inputs, stems)]
    existing = [t for targets in planned for t in targets if t.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise DataError(f"{existing[0]}: already exists{more}; expected a new file (pass --overwrite / overwrite=True to replace, "
                        f"or choose another --out); nothing was written")

    # every input is read and checked before anything is written
    bad = []
    for path in bar(inputs, desc="predict: checking", unit="file", enabled=progress):
        try:
            _read_input(path, two_and_half_d, allow_label_like)
        except DataError as exc:
            bad.append(str(exc))
    if bad:
        more = f" [{len(bad) - 1} more bad input(s) of {len(inputs)}]" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}; nothing was written")

    model = load_model(cfg, weights_path).to(pick_device(device))
    made = missing_folders(out_dir)
    staging = out_dir / f".fedfms-predict-{os.getpid()}"
    c = len(names)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        files = bar(total=len(inputs), desc="predict", unit="file", enabled=progress)
        pending: list[tuple[Path, list[Path], np.ndarray]] = []  # 2D inputs waiting to fill a batch

        def flush() -> None:
            # the files of a folder go through the model batch_size at a time, whatever their sizes
            soft = next(batched_probabilities(model, [image for *_, image in pending], len(pending), resize=resize))
            for (path, targets, image), p in zip(pending, soft):
                _write_outputs(path, targets, image[None], p[None], threshold, c, overlay, probabilities, staging,
                               two_and_half_d)
            files.update(len(pending))
            pending.clear()

        for path, targets in zip(inputs, planned):
            if _kind(path) == "image":
                pending.append((path, targets, _read_input(path, two_and_half_d, allow_label_like)[0]))
                if len(pending) == batch_size:
                    flush()
                continue
            slices = _read_input(path, two_and_half_d, allow_label_like)
            soft = np.concatenate(list(batched_probabilities(model, slices, batch_size, resize=resize)))  # (N, C, H, W)
            _write_outputs(path, targets, slices, soft, threshold, c, overlay, probabilities, staging, two_and_half_d)
            files.update()
        if pending:
            flush()
        files.close()
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError):
            raise DataError(f"{exc.filename or out_dir}: could not write predictions ({exc.strerror or exc}); "
                            f"nothing was written") from None
        raise
    outputs: list[Path] = []
    try:
        for target in (t for targets in planned for t in targets):
            os.replace(staging / target.name, target)
            outputs.append(target)
    except OSError as exc:
        raise DataError(
            f"{target}: could not move it into place ({exc.strerror or exc}); {len(outputs)} of "
            f"{sum(map(len, planned))} outputs were written ({', '.join(p.name for p in outputs) or 'none'}), the rest are in {staging}"
        ) from None
    shutil.rmtree(staging, ignore_errors=True)
    return outputs


def _write_outputs(path: Path, targets: list[Path], slices: np.ndarray, soft: np.ndarray, threshold: float, c: int,
                   overlay: bool, probabilities: bool, staging: Path, two_and_half_d: bool) -> None:
    """One input's outputs into ``staging``: masks (``soft`` > ``threshold``), overlays, probability maps."""
    masks = (soft > threshold).astype(np.uint8)  # (N, C, H, W)
    mask_targets = targets[:c]  # then the overlays, then the probability maps (_output_names)
    pictures = targets[c : 2 * c] if overlay else []
    soft_targets = targets[len(targets) - c :] if probabilities else []
    for k, target in enumerate(pictures):
        # 2.5D inputs: the middle channel is the slice itself, the others its neighbours
        shown = slices[..., 1] if two_and_half_d and _kind(path) != "image" else slices
        Image.fromarray(_overlay_picture(shown, masks[:, k])).save(staging / target.name)
    if _kind(path) == "image":
        for target, m in zip(mask_targets, masks[0]):  # (C, H, W)
            Image.fromarray(m * 255, "L").save(staging / target.name)
        for target, p in zip(soft_targets, soft[0]):
            _write_tiff(staging / target.name, p.astype(np.float32))
    else:
        for target, m in zip(mask_targets, np.moveaxis(masks, 0, -1)):  # (C, H, W, D)
            _write_nifti_like(path, staging / target.name, m, np.uint8, (0, 1))
        for target, p in zip(soft_targets, np.moveaxis(soft, 0, -1)):
            _write_nifti_like(path, staging / target.name, p.astype(np.float32), np.float32, (0.0, 1.0))


def _write_tiff(path: Path, array: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, array)


def _write_nifti_like(source_path: Path, path: Path, data: np.ndarray, dtype, cal: tuple) -> None:
    """``data`` as a NIfTI with the geometry of ``source_path`` (its header keeps the qform/sform codes, voxel
    sizes and units)."""
    import nibabel as nib

    source = nib.load(str(source_path))  # header only
    img = nib.Nifti1Image(np.ascontiguousarray(data), source.affine, header=source.header)
    img.set_data_dtype(dtype)
    img.header["cal_min"], img.header["cal_max"] = cal
    nib.save(img, path)
