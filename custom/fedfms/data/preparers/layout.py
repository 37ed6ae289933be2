"""Data enters through one importer: per site, a folder of images and their masks, or volumes and their labels.

This is the general case: ``fedfms prepare images`` and ``fedfms prepare volumes`` (:mod:`.own`) read a hospital's
own data with it. Each public dataset is a *layout* over the same code — where its files are, how their names
pair, and how its mask values become classes — not a second implementation: fundus and nuclei read their image
pairs with :func:`image_case`, prostate, FeTS and the demo their volumes with :func:`volume_case`, and every site
is written by :func:`fedfms.data.preparers.common.write_site` with the same checks (constant, label-like or NaN
images, size mismatches, re-run exactness).

Pairing is by file name (:func:`fedfms.data.preparers.common.pair_files`). Mask values become classes by one of
the codings here (own data) or a dataset's own mapping (fundus' REFUGE grey levels, prostate's zones, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fedfms.data import volumes as vol
from fedfms.data.preparers import common
from fedfms.errors import ConfigError, DataError
from fedfms.data.site_dataset import MAX_CLASSES

MASK_CODINGS = ("auto", "instances")
CLASS_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def parse_classes(value, default: Sequence[str] = ("foreground",)) -> list[str]:
    """Class names from ``"disc,cup"`` or a list: 1 to 8 distinct names of letters, digits, ``_``, ``-``, ``.``
    (they become parts of file names: ``<id>_<class>.png`` masks, ``<stem>_<class>.png`` predictions)."""
    if value is None:
        return list(default)
    names = [c.strip() for c in value.split(",")] if isinstance(value, str) else [str(c).strip() for c in value]
    expected = f"expected 1 to {MAX_CLASSES} distinct names such as disc,cup (letters, digits, _ - .)"
    if not names or not all(names) or len(names) > MAX_CLASSES or len(set(names)) != len(names):
        raise ConfigError(f"classes {value!r}: {expected}")
    bad = [n for n in names if not set(n) <= CLASS_NAME_CHARS]
    if bad:
        raise ConfigError(f"classes {value!r}: {bad[0]!r} has characters other than letters, digits, _ - .; {expected}")
    return names


# ----------------------------------------------------------------------------------------------------
# mask values -> classes


def _shown(values) -> str:
    values = [int(v) for v in values]
    return str(values[:8])[:-1] + (", ...]" if len(values) > 8 else "]")


def binary_mask(labels: np.ndarray, path: Path, meaning: str) -> np.ndarray:
    """A one-class mask stored as 0/1 or 0/255 -> {0, 1} uint8; anything else is refused naming ``path``."""
    values = np.unique(labels)
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        return (labels > 0).astype(np.uint8)
    hint = " (a lossy JPEG mask? save masks as PNG or TIFF)" if path.suffix.lower() in (".jpg", ".jpeg") else ""
    raise DataError(f"{path}: mask values {_shown(values)}; expected 0/255 or 0/1 ({meaning}){hint}")


def classes_from_labels(labels: np.ndarray, path: Path, classes: Sequence[str], coding: str = "auto") -> np.ndarray:
    """One mask file holding every class -> (C, ...) uint8 {0, 1}.

    ``auto``: one class: 0/255 or 0/1 (0 background); several: index-coded, 0 background and k the k-th class
    (1 = ``classes[0]``), so the classes do not overlap. ``instances``: one class, every value > 0 (an instance
    id) is the class."""
    classes = list(classes)
    if coding == "instances":
        if (labels < 0).any():
            raise DataError(f"{path}: unexpected label values {_shown(np.unique(labels[labels < 0]))}; "
                            f"expected instance ids >= 0 (0 = background)")
        return (labels > 0).astype(np.uint8)[None]
    if len(classes) == 1:
        return binary_mask(labels, path, f"background / {classes[0]}")[None]
    allowed = range(len(classes) + 1)
    values = np.unique(labels)
    if not set(values.tolist()) <= set(allowed):
        coded = ", ".join(f"{k + 1} {c}" for k, c in enumerate(classes))
        raise DataError(f"{path}: mask values {_shown(values)}; expected index coding 0..{len(classes)} (0 background, "
                        f"{coded}), or one file per class ({path.stem}_{classes[0]}{path.suffix}, ...)")
    return np.stack([labels == k + 1 for k in range(len(classes))]).astype(np.uint8)


def classes_from_files(arrays: Sequence[np.ndarray], paths: Sequence[Path], classes: Sequence[str]) -> np.ndarray:
    """One binary file per class (0/1 or 0/255 each; classes may overlap) -> (C, ...) uint8."""
    return np.stack([binary_mask(a, p, f"background / {c}") for a, p, c in zip(arrays, paths, classes)])


def check_coding(coding: str, classes: Sequence[str]) -> str:
    if coding not in MASK_CODINGS:
        raise ConfigError(f"mask coding is {coding!r}; expected auto (0/255 or 0/1 for one class, 0..C for several) or "
                          f"instances (one class; every id > 0)")
    if coding == "instances" and len(classes) != 1:
        raise ConfigError(f"mask coding instances makes one class; classes are {','.join(classes)}")
    return coding


# ----------------------------------------------------------------------------------------------------
# 2D images


@dataclass(frozen=True)
class ImageRecipe:
    """How a 2D pair becomes a sample. ``to_classes(labels, path)``: a file holding every class -> (C, H, W) {0, 1};
    ``read_mask(path, (H, W))``: the mask file's labels (the image size for drawn annotations such as XML);
    ``window``: (low, high) percentiles mapping every image's own intensities to [0, 1], None: 8-bit images only."""

    classes: tuple[str, ...]
    to_classes: Callable[[np.ndarray, Path], np.ndarray]
    read_mask: Callable[[Path, tuple[int, int]], np.ndarray] = lambda path, _size: common.read_label_image(path)
    window: tuple[float, float] | None = None
    window_fix: str = "convert it to 8 bits first, choosing the intensity window yourself"


def _check_size(labels: np.ndarray, path: Path, image_path: Path, shape: tuple) -> None:
    if labels.shape != tuple(shape):
        raise DataError(f"{path}: mask size {labels.shape} differs from image {image_path.name} size {tuple(shape)}; "
                        f"expected the same height and width")


def load_image_pair(pair: common.Pair, patient: str, recipe: ImageRecipe) -> list[common.Sample]:
    image = common.read_image(pair.image, recipe.window, recipe.window_fix)
    arrays = [recipe.read_mask(m, image.shape[:2]) for m in pair.masks]
    for labels, path in zip(arrays, pair.masks):
        _check_size(labels, path, pair.image, image.shape[:2])
    if pair.per_class:
        mask = classes_from_files(arrays, pair.masks, recipe.classes)
    else:
        mask = recipe.to_classes(arrays[0], pair.masks[0])
    return [common.Sample(image, mask, patient, None, pair.id)]


def image_case(pair: common.Pair, patient: str, recipe: ImageRecipe) -> common.Case:
    """The case of one image pair (read, checked and mapped only when written)."""
    return common.Case(pair.id, pair.image, partial(load_image_pair, pair, patient, recipe), (pair.image, *pair.masks))


def subfolders(site_dir: Path) -> dict[str, Path]:
    """The site's visible subfolders by :func:`~fedfms.data.preparers.common.norm_name` (``Images`` == ``images``)."""
    return {common.norm_name(p.name): p for p in site_dir.iterdir() if p.is_dir() and common.visible(p)}


def find_image_pairs(site_dir: Path, classes: Sequence[str] | None = None, masks: str = "masks",
                     mask_exts: Sequence[str] = common.MASK_EXTS, layout: str = "see docs/data-format.md"):
    """``site_dir/images/*`` paired with ``site_dir/<masks>/*`` (:func:`~fedfms.data.preparers.common.pair_files`):
    (pairs, problems). Two files with one name (``a.png``, ``a.tif``) in one folder are an error."""
    dirs = subfolders(site_dir)
    if "images" not in dirs or masks not in dirs:
        raise DataError(f"{site_dir}: subfolders are {sorted(p.name for p in dirs.values()) or 'none'}; "
                        f"expected images/ and {masks}/ ({layout})")
    return common.pair_files(common.list_files(dirs["images"], common.IMAGE_EXTS),
                             common.list_files(dirs[masks], mask_exts), classes)


# ----------------------------------------------------------------------------------------------------
# 3D volumes


@dataclass(frozen=True)
class VolumeRecipe:
    """How a volume pair becomes slices. ``to_classes(seg, path)``: a label volume -> (H, W, D) bool (one class) or
    (C, H, W, D); the windowing and slice selection are the prostate/FeTS preparers' options
    (:func:`fedfms.data.preparers.common.volume_samples`)."""

    classes: tuple[str, ...]
    to_classes: Callable[[np.ndarray, Path], np.ndarray]
    low_pct: float = 1.0
    high_pct: float = 99.0
    empty_keep: int | float | str | None = None
    two_and_half_d: bool = False
    skip_end_slices: bool = False


def load_volume_pair(image_path: Path, seg_paths: Sequence[Path], case_id: str, recipe: VolumeRecipe,
                     per_class: bool = False, sample_prefix: str | None = None) -> list[common.Sample]:
    """Load a volume and its label volume(s) (same voxel grid), map the labels to classes, window and slice it.
    ``case_id``: the slices' volume (patient) id; ``sample_prefix``: their sample ids' start (default ``case_id``)."""
    image, affine = vol.load_nifti(image_path)
    segs = [vol.load_segmentation_like(p, image_path, image.shape, affine) for p in seg_paths]
    if per_class:
        target = classes_from_files(segs, seg_paths, recipe.classes)
    else:
        target = recipe.to_classes(segs[0], Path(seg_paths[0]))
    if not np.asarray(target).any():
        common.warn(f"{seg_paths[0]}: segmentation is empty (no {' / '.join(recipe.classes)} voxels)")
    return common.volume_samples(
        image, target, case_id, low_pct=recipe.low_pct, high_pct=recipe.high_pct, empty_keep=recipe.empty_keep,
        two_and_half_d=recipe.two_and_half_d, skip_end_slices=recipe.skip_end_slices, path=image_path,
        sample_prefix=sample_prefix,
    )


def volume_case(case_id: str, image: Path, segs: Sequence[Path], volume_id: str, recipe: VolumeRecipe,
                per_class: bool = False, sample_prefix: str | None = None) -> common.Case:
    """The case of one volume pair; its slices' volume id is ``volume_id``."""
    segs = tuple(Path(p) for p in segs)
    load = partial(load_volume_pair, image, segs, volume_id, recipe, per_class, sample_prefix)
    return common.Case(case_id, image, load, (image, *segs))


def nifti_files(folder: Path) -> dict[str, Path]:
    """stem (``case01`` of ``case01.nii.gz``) -> file for the NIfTI files in ``folder``; one stem twice is an error."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        stem = vol.nifti_stem(p)
        if p.is_file() and common.visible(p) and stem is not None:
            if stem in out:
                raise DataError(f"{folder}: files {out[stem].name} and {p.name} share the id {stem!r}; expected one file per id")
            out[stem] = p
    return out


# nnU-Net names a case's images <case>_0000.nii.gz (channel 0) and its label <case>.nii.gz
NNUNET_CHANNEL = "_0000"
VOLUME_LABEL_SUFFIXES = ("", "_seg", "_segmentation", "_label", "_labels", "_mask", "_gt")


def nnunet_ids(stem: str) -> tuple[str, ...]:
    return (stem, stem[: -len(NNUNET_CHANNEL)]) if stem.endswith(NNUNET_CHANNEL) and len(stem) > len(NNUNET_CHANNEL) else (stem,)


def find_volume_pairs(site_dir: Path, classes: Sequence[str], labels: str = "labels"):
    """``site_dir/images/*.nii.gz`` paired with ``site_dir/<labels>/*.nii.gz``: (pairs, problems)."""
    dirs = subfolders(site_dir)
    if "images" not in dirs or labels not in dirs:
        raise DataError(f"{site_dir}: subfolders are {sorted(p.name for p in dirs.values()) or 'none'}; "
                        f"expected images/ and {labels}/ with NIfTI files (see docs/data-format.md)")
    images, segs = nifti_files(dirs["images"]), nifti_files(dirs[labels])
    if not images:
        raise DataError(f"{dirs['images']}: no NIfTI files (.nii, .nii.gz); expected one volume per case")
    return common.pair_files(images, segs, classes, suffixes=VOLUME_LABEL_SUFFIXES, ids=nnunet_ids)
