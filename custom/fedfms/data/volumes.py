"""3D NIfTI handling shared by the volumetric preparers (prostate, FeTS) and the demo builder.

The paper's recipe for 3D data: slice along the last (depth) axis, window each volume between its own
1st and 99th intensity percentiles, scale linearly to [0, 1] and clip. Nothing is reoriented or
resampled: image and segmentation are used in voxel order, which is why their shapes and affines must
agree before a single slice is taken.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from fedfms.errors import ConfigError, DataError
from fedfms.data import intensity

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Float storage of qform/sform and re-saving in viewers move affines by ~1e-5; a real mismatch (other
# orientation, other spacing, other origin) is orders of magnitude larger.
DEFAULT_AFFINE_TOL = 1e-3


def nifti_stem(path: str | os.PathLike) -> str | None:
    """``Case00.nii.gz`` -> ``Case00``; ``None`` for anything that is not a NIfTI file name."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _read_nifti(path: Path, what: str):
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    if not path.is_file():
        raise DataError(f"{path}: file is missing; expected the {what} NIfTI file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; expected a NIfTI {what}")
    try:
        img = nib.load(str(path))
        # nib.load only parses the header; a truncated gzip stream shows up when the voxels are read.
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except (ImageFileError, HeaderDataError) as exc:
        raise DataError(f"{path}: not a readable NIfTI file ({exc}); expected a NIfTI {what}") from None
    except PermissionError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror}); expected a readable NIfTI {what}") from None
    except (EOFError, zlib.error, OSError, ValueError, MemoryError) as exc:
        raise DataError(f"{path}: truncated or corrupt NIfTI data ({type(exc).__name__}: {exc}); "
                        f"expected a complete NIfTI {what}") from None
    # Some exporters append singleton time/channel axes ((H,W,D,1)); they carry no information.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: volume has shape {data.shape}; expected a 3D volume (H, W, D)")
    if min(data.shape) < 1:
        raise DataError(f"{path}: volume has shape {data.shape}; expected non-empty axes")
    return data, affine


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load one 3D volume as float32 plus its 4x4 affine; DataError names the file on any problem."""
    path = Path(path)
    data, affine = _read_nifti(path, "image")
    image = np.asarray(data, dtype=np.float32)
    if not np.isfinite(image).all():
        raise DataError(f"{path}: volume contains NaN/inf voxels; expected finite intensities")
    return image, affine


def load_segmentation(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a label volume as int32 plus its affine. Labels stored as floats are accepted only when
    they are whole numbers: anything else means the file is a probability map or was resampled
    with interpolation, and rounding would silently move the boundary."""
    path = Path(path)
    data, affine = _read_nifti(path, "segmentation")
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise DataError(f"{path}: segmentation contains NaN/inf; expected integer labels")
        rounded = np.rint(data)
        if np.abs(data - rounded).max(initial=0.0) > 1e-3:
            raise DataError(f"{path}: segmentation has non-integer values; expected integer labels")
        data = rounded
    return np.asarray(data, dtype=np.int32), affine


def load_nifti_pair(
    image_path: str | os.PathLike,
    seg_path: str | os.PathLike,
    affine_tol: float = DEFAULT_AFFINE_TOL,
) -> tuple[np.ndarray, np.ndarray]:
    """Load an image volume (float32) and its segmentation (int32) and check they share the voxel grid.

    Raises DataError naming the segmentation file when its shape or affine differs from the image's."""
    image_path, seg_path = Path(image_path), Path(seg_path)
    image, image_affine = load_nifti(image_path)
    return image, load_segmentation_like(seg_path, image_path, image.shape, image_affine, affine_tol)


def load_segmentation_like(seg_path: str | os.PathLike, image_path: str | os.PathLike, shape: tuple, affine: np.ndarray,
                           affine_tol: float = DEFAULT_AFFINE_TOL) -> np.ndarray:
    """:func:`load_segmentation`, refused (DataError naming ``seg_path``) unless it lies on the voxel grid of the image
    ``image_path`` (its ``shape`` and ``affine``)."""
    seg_path = Path(seg_path)
    seg, seg_affine = load_segmentation(seg_path)
    if seg.shape != tuple(shape):
        raise DataError(f"{seg_path}: segmentation shape {seg.shape} differs from image {Path(image_path).name} shape "
                        f"{tuple(shape)}; expected the same voxel grid")
    diff = float(np.abs(seg_affine - affine).max())
    if diff > affine_tol:
        raise DataError(
            f"{seg_path}: segmentation affine differs from image {Path(image_path).name} affine (max difference {diff:.4g}); "
            f"expected the same voxel-to-world mapping (tolerance {affine_tol:g})"
        )
    return seg


def check_percentiles(low_pct: float, high_pct: float) -> None:
    if not (0.0 <= low_pct < high_pct <= 100.0):
        raise ConfigError(f"intensity window percentiles are low={low_pct}, high={high_pct}; expected 0 <= low < high <= 100")


def window_percentiles(volume: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0) -> np.ndarray:
    """Map ``volume`` linearly so its ``low_pct`` percentile is 0 and ``high_pct`` percentile is 1, then
    clip to [0, 1]. Percentiles are taken over every voxel of this volume (per-volume window).

    A constant volume has no window; it maps to all zeros rather than dividing by zero. Data entering the
    project goes through :func:`window_volume` instead, which refuses such a volume."""
    check_percentiles(low_pct, high_pct)
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(v, [low_pct, high_pct])
    if not hi > lo:
        return np.zeros_like(v, dtype=np.float32)
    out = (v - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def window_volume(volume: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0, path: str | os.PathLike = "volume") -> np.ndarray:
    """:func:`window_percentiles` for a volume that enters the project (prepare, predict): a constant volume, a
    label map passed as an image, or one whose window is empty is refused with a DataError naming ``path``
    instead of becoming all-black slices (see :mod:`fedfms.data.intensity`)."""
    check_percentiles(low_pct, high_pct)
    intensity.check_content(volume, str(path), "volume")
    return intensity.window(volume, low_pct, high_pct, str(path), "volume")


def iter_depth_slices(volume: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k, volume[:, :, k])`` along the last axis."""
    if volume.ndim != 3:
        raise DataError(f"volume has shape {volume.shape}; expected (H, W, D)")
    for k in range(volume.shape[-1]):
        yield k, volume[:, :, k]


def neighbour_stack(volume: np.ndarray, k: int, context: int = 1) -> np.ndarray:
    """2.5D input for slice ``k``: slices ``k-context .. k+context`` as channels, (H, W, 2*context+1).

    At the first and last slice the missing neighbour is replaced by the edge slice itself, so every
    slice gets the same number of channels and the centre channel is always slice ``k``."""
    depth = volume.shape[-1]
    if not 0 <= k < depth:
        raise IndexError(f"slice {k} outside a volume of depth {depth}")
    idx = np.clip(np.arange(k - context, k + context + 1), 0, depth - 1)
    return np.stack([volume[:, :, i] for i in idx], axis=-1)


def iter_slices_2p5d(volume: np.ndarray, context: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """Like :func:`iter_depth_slices` but each item is the (H, W, 3) neighbour stack."""
    for k in range(volume.shape[-1]):
        yield k, neighbour_stack(volume, k, context)


EVERY_PREFIX = "every:"


def parse_empty_keep(value) -> int | float | str | None:
    """Parse how many target-free slices to keep per volume.

    ``None``/"all"  -> keep all;
    an integer ("0", "5", 5) -> at most that many per volume;
    a number with a decimal point in [0, 1] ("0.1", 0.25) -> that fraction of the volume's empty slices;
    "every:N" -> an empty slice is kept when its index is a multiple of N (the paper code's FeTS rule, N = 5),
    returned as the canonical string ``"every:N"``.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"empty-slices-keep is {value!r}; expected 'all', a count (e.g. 5), a fraction (e.g. 0.1) or every:N")
    if isinstance(value, int):
        parsed: int | float = value
    elif isinstance(value, float):
        parsed = value
    else:
        text = str(value).strip().lower()
        if text == "all":
            return None
        if text.startswith(EVERY_PREFIX):
            step = text[len(EVERY_PREFIX):].strip()
            if not step.isdigit() or int(step) < 1:
                raise ConfigError(f"empty-slices-keep is {value!r}; expected every:N with N a positive integer "
                                  f"(every:5 keeps the empty slices whose index is a multiple of 5)")
            return f"{EVERY_PREFIX}{int(step)}"
        try:
            parsed = float(text) if any(c in text for c in ".e") else int(text)
        except ValueError:
            raise ConfigError(f"empty-slices-keep is {value!r}; "
                              f"expected 'all', a count (e.g. 5), a fraction (e.g. 0.1) or every:N") from None
    if isinstance(parsed, float):
        if not 0.0 <= parsed <= 1.0:
            raise ConfigError(f"empty-slices-keep fraction is {parsed}; expected a value in [0, 1] (or an integer count)")
        return None if parsed == 1.0 else parsed
    if parsed < 0:
        raise ConfigError(f"empty-slices-keep count is {parsed}; expected a non-negative integer")
    return parsed


def select_slices(has_target: np.ndarray, empty_keep: int | float | str | None, skip_end_slices: bool = False) -> list[int]:
    """Indices of the slices to keep: every slice with target, plus empty ones per ``empty_keep``
    (see :func:`parse_empty_keep`). Counts and fractions pick empty slices evenly spaced through the volume,
    which is deterministic (re-runs give the same files) and samples the whole depth range; ``"every:N"`` keeps
    the empty slices whose index is a multiple of N. ``skip_end_slices``: the first and the last slice are never
    kept (the paper code's FeTS rule; its 2.5D input then always has two real neighbours)."""
    has_target = np.asarray(has_target, dtype=bool)
    candidates = np.arange(len(has_target))
    if skip_end_slices:
        candidates = candidates[1:-1]
    positive = candidates[has_target[candidates]]
    empty = candidates[~has_target[candidates]]
    if isinstance(empty_keep, str):
        step = int(parse_empty_keep(empty_keep)[len(EVERY_PREFIX):])
        chosen = empty[empty % step == 0]
        return sorted(set(positive.tolist()) | set(chosen.tolist()))
    if empty_keep is None:
        keep_n = len(empty)
    elif isinstance(empty_keep, float):
        keep_n = int(round(empty_keep * len(empty)))
    else:
        keep_n = min(int(empty_keep), len(empty))
    if keep_n >= len(empty):
        chosen = empty
    elif keep_n == 0:
        chosen = empty[:0]
    else:
        # centres of keep_n equal bins over the empty slices
        picks = ((np.arange(keep_n) + 0.5) * len(empty) / keep_n).astype(int)
        chosen = empty[picks]
    return sorted(set(positive.tolist()) | set(chosen.tolist()))
