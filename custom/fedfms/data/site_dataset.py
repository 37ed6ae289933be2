"""The on-disk format of one site's prepared 2D samples, its reader and its writer.

Layout of a site folder (documented in docs/data-format.md)::

    SITE/
      manifest.json          format, classes, sizes, preparer settings, counts, one entry per sample
      images/<id>.png        RGB uint8, image_size x image_size (grey slices copied to 3 channels)
      masks/<id>.png         uint8 grey, mask_size x mask_size; bit k set <=> pixel is in class k

Images keep their aspect ratio by default (longest side to the square's side, zeros padded at the bottom and
right: SAM's way, :mod:`fedfms.data.geometry`); the manifest says so (``resize``) and records every sample's
original size and padding, so scores leave the padding out and predictions can be cropped back.
Bit-packed masks keep overlapping classes (fundus: the disc contains the cup) in one lossless PNG.
Every sample records the volume (patient / case) it came from so splits and 3D metrics work per patient.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fedfms.data.geometry import (DEFAULT_MASK_RESIZE, LEGACY_RESIZE, MASK_RESIZES, PAD, RESIZE_MODES, content_shape,
                                  fit_image, fit_mask, resize_image, resize_mask, valid_region)
from fedfms.errors import DataError
from fedfms.data.intensity import UNIT_RULES
from fedfms.data import intensity

FORMAT_NAME = "fedfms-site"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_CLASSES = 8  # one bit per class in a uint8 mask PNG
DEFAULT_IMAGE_SIZE = 1024
DEFAULT_MASK_SIZE = 256


# ----------------------------------------------------------------------------------------------------
# resizing shared by the writer (preparation) and the reader (when a model wants another size):
# fedfms.data.geometry (kept importable from here)


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """(C,H,W) {0,1} -> (H,W) uint8 with bit k for class k."""
    packed = np.zeros(mask.shape[1:], dtype=np.uint8)
    for k in range(mask.shape[0]):
        packed |= (mask[k] > 0).astype(np.uint8) << k
    return packed


def unpack_mask(packed: np.ndarray, num_classes: int) -> np.ndarray:
    """(H,W) uint8 -> (C,H,W) float32 {0,1}."""
    return np.stack([((packed >> k) & 1).astype(np.float32) for k in range(num_classes)])


# ----------------------------------------------------------------------------------------------------
# manifest


@dataclass
class SampleRecord:
    id: str
    volume: str
    image: str
    mask: str
    slice: int | None = None
    size: list[int] | None = None  # [H, W] of the raw image (or slice) before resizing
    pad: list[int] | None = None  # [bottom, right]: padded rows and columns at image_size (resize "pad")


@dataclass
class SiteManifest:
    site: str
    dataset: str
    classes: list[str]
    image_size: int
    mask_size: int
    samples: list[SampleRecord]
    settings: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    resize: str = LEGACY_RESIZE  # fedfms.data.geometry; manifests written before it existed were stretched

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def volumes(self) -> list[str]:
        return [s.volume for s in self.samples]

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "site": self.site,
            "dataset": self.dataset,
            "classes": self.classes,
            "image_size": self.image_size,
            "mask_size": self.mask_size,
            "resize": self.resize,
            "settings": self.settings,
            "counts": self.counts,
            "samples": [
                {k: v for k, v in vars(s).items() if v is not None} for s in self.samples
            ],
        }


def _require(obj: dict, key: str, kind, path: Path, what: str):
    if key not in obj:
        raise DataError(f"{path}: field '{key}' is missing; expected {what}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"{path}: field '{key}' is {value!r}; expected {what}")
    return value


def read_manifest(site_dir: str | os.PathLike) -> SiteManifest:
    """Read and validate ``SITE/manifest.json``; raises DataError naming the file and field."""
    site_dir = Path(site_dir)
    path = site_dir / MANIFEST
    if site_dir.exists() and not site_dir.is_dir():
        raise DataError(f"{site_dir}: is a file; expected a prepared site folder (see docs/data-format.md)")
    if not site_dir.is_dir():
        raise DataError(f"{site_dir}: site folder does not exist; expected a prepared site (see docs/data-format.md)")
    if not path.is_file():
        raise DataError(f"{path}: manifest is missing; expected a site prepared by 'fedfms prepare'")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected a fedfms site manifest") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: field 'format' is {raw.get('format') if isinstance(raw, dict) else raw!r}; expected '{FORMAT_NAME}'")
    if raw.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: field 'version' is {raw.get('version')!r}; expected {FORMAT_VERSION}")
    classes = _require(raw, "classes", list, path, "a non-empty list of class names")
    if not 1 <= len(classes) <= MAX_CLASSES or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: field 'classes' is {classes!r}; expected 1 to {MAX_CLASSES} class names")
    image_size = _require(raw, "image_size", int, path, "a positive integer")
    mask_size = _require(raw, "mask_size", int, path, "a positive integer")
    if image_size <= 0 or mask_size <= 0:
        raise DataError(f"{path}: image_size/mask_size must be positive, got {image_size}/{mask_size}")
    entries = _require(raw, "samples", list, path, "a list of samples")
    if not entries:
        raise DataError(f"{path}: field 'samples' is empty; expected at least one sample (site has no usable cases)")
    resize = raw.get("resize", LEGACY_RESIZE)
    if resize not in RESIZE_MODES:
        raise DataError(f"{path}: field 'resize' is {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
    samples = []
    seen = set()
    for i, entry in enumerate(entries):
        where = f"samples[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{path}: field '{where}' is {entry!r}; expected an object")
        for key in ("id", "volume", "image", "mask"):
            if not isinstance(entry.get(key), str) or not entry.get(key):
                raise DataError(f"{path}: field '{where}.{key}' is {entry.get(key)!r}; expected a non-empty string")
        if entry["id"] in seen:
            raise DataError(f"{path}: field '{where}.id' repeats id {entry['id']!r}; expected unique ids")
        seen.add(entry["id"])
        size, pad = entry.get("size"), entry.get("pad")
        if size is not None and not _int_pair(size, 1):
            raise DataError(f"{path}: field '{where}.size' is {size!r}; expected [height, width] in pixels")
        if pad is not None and not _int_pair(pad, 0):
            raise DataError(f"{path}: field '{where}.pad' is {pad!r}; expected [bottom, right] padded pixels (>= 0)")
        samples.append(SampleRecord(entry["id"], entry["volume"], entry["image"], entry["mask"], entry.get("slice"),
                                    list(size) if size is not None else None, list(pad) if pad is not None else None))
    return SiteManifest(
        site=str(raw.get("site", site_dir.name)),
        dataset=str(raw.get("dataset", "unknown")),
        classes=list(classes),
        image_size=image_size,
        mask_size=mask_size,
        samples=samples,
        settings=dict(raw.get("settings", {})),
        counts=dict(raw.get("counts", {})),
        resize=resize,
    )


def _int_pair(value, minimum: int) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value))


# ----------------------------------------------------------------------------------------------------
# reader


def _load_png(path: Path, mode: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file is missing; the manifest lists it")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != mode:
                raise DataError(f"{path}: PNG mode is {im.mode}; expected {mode}")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


class SiteDataset(torch.utils.data.Dataset):
    """Reads one prepared site. Items are dicts with ``image`` (3,H,W) float in [0,1], ``mask`` (C,h,w)
    float {0,1}, ``valid`` (1,h,w) bool (False on padding: the pixels scores leave out), ``volume`` and ``id``.
    Images/masks are resized when ``image_size``/``mask_size`` differ from the prepared sizes (bilinear /
    nearest)."""

    def __init__(
        self,
        site_dir: str | os.PathLike,
        indices: Sequence[int] | None = None,
        image_size: int | None = None,
        mask_size: int | None = None,
        transform=None,
    ):
        self.site_dir = Path(site_dir)
        self._decoded: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
        self.manifest = read_manifest(self.site_dir)
        self.indices = list(range(len(self.manifest.samples))) if indices is None else list(indices)
        self.image_size = image_size or self.manifest.image_size
        self.mask_size = mask_size or self.manifest.mask_size
        self.transform = transform
        missing = [
            self.site_dir / rel
            for i in self.indices
            for rel in (self.manifest.samples[i].image, self.manifest.samples[i].mask)
            if not (self.site_dir / rel).is_file()
        ]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{missing[0]}: file is missing{more}; the manifest {self.site_dir / MANIFEST} lists it")

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def volumes(self) -> list[str]:
        return [self.manifest.samples[i].volume for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def decoded_bytes(self) -> int:
        """Memory the decoded images and masks of this dataset take (uint8, before any resize)."""
        m = self.manifest
        return len(self.indices) * (3 * m.image_size**2 + m.mask_size**2)

    def preload(self) -> None:
        """Decode every PNG once and keep the uint8 arrays: later epochs skip the decoding (DataLoader workers
        started after this share the arrays with the main process instead of decoding again)."""
        self._decoded = {i: self._read(i) for i in self.indices}

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.manifest.samples[index]
        return _load_png(self.site_dir / rec.image, "RGB"), _load_png(self.site_dir / rec.mask, "L")

    def __getitem__(self, item: int) -> dict:
        index = self.indices[item]
        rec = self.manifest.samples[index]
        image_path, mask_path = self.site_dir / rec.image, self.site_dir / rec.mask
        image, packed = self._decoded[index] if self._decoded is not None and index in self._decoded else self._read(index)
        m = self.manifest
        if image.shape[:2] != (m.image_size, m.image_size):
            raise DataError(f"{image_path}: shape is {image.shape[:2]}; "
                            f"expected ({m.image_size}, {m.image_size}) from the manifest's image_size")
        if packed.shape != (m.mask_size, m.mask_size):
            raise DataError(f"{mask_path}: shape is {packed.shape}; expected ({m.mask_size}, {m.mask_size}) from the manifest's mask_size")
        if packed.max(initial=0) >> m.num_classes:
            raise DataError(
                f"{mask_path}: label value {int(packed.max())} uses bits beyond the {m.num_classes} class(es) {m.classes}; "
                f"expected values below {1 << m.num_classes}"
            )
        image_t = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
        mask_t = torch.from_numpy(unpack_mask(packed, m.num_classes))
        sample = {
            "image": resize_image(image_t, self.image_size),
            "mask": resize_mask(mask_t, self.mask_size),
            "valid": valid_region(rec.size, self.mask_size, m.resize),
            "volume": rec.volume,
            "id": rec.id,
        }
        return self.transform(sample) if self.transform else sample


def patient_split(volumes: Sequence[str], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of sample indices so that no volume (patient) is in both parts.

    The paper splits each training site 9:1 into train/val; ``val_fraction`` is the share of *volumes*
    held out (at least one when there are two or more volumes)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction is {val_fraction}; expected a number in [0, 1)")
    unique = sorted(set(volumes))
    rng = np.random.default_rng(seed)
    order = [unique[i] for i in rng.permutation(len(unique))]
    n_val = int(round(val_fraction * len(unique)))
    if val_fraction > 0 and len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    val_volumes = set(order[:n_val])
    train = [i for i, v in enumerate(volumes) if v not in val_volumes]
    val = [i for i, v in enumerate(volumes) if v in val_volumes]
    return train, val


# ----------------------------------------------------------------------------------------------------
# writer


def site_is_complete(out_dir: str | os.PathLike) -> bool:
    try:
        read_manifest(out_dir)
        return True
    except DataError:
        return False


class SiteWriter:
    """Writes a site folder atomically: samples go to ``<out>.partial`` and the folder is renamed into
    place only after the manifest is written, so a crash never leaves something that looks complete.

    An existing output is never replaced unless ``overwrite=True``; when anything fails (bad input, a full disk,
    an unwritable folder) the ``.partial`` folder and any parent folder this writer created are removed again.

    Volume ids are stored as ``<site>_<volume>`` (unless they already start with it), so two sites never share
    one and pooled sites keep their patients apart; sample ids (file names) are not changed.

    ``intensity``: how images become [0, 1] (:mod:`fedfms.data.intensity`): ``"unit"`` (default) takes uint8 / 255
    and floats already in [0, 1] and refuses anything else (uint16, floats outside [0, 1]) with the range it saw;
    ``"window"`` maps every image's own 1st..99th percentile to [0, 1].

    ``mask_resize``: the nearest-neighbour rule masks are resized with (:data:`MASK_RESIZES`); another rule than
    the default is recorded in the settings.

    ``resize`` (:mod:`fedfms.data.geometry`): ``"pad"`` (default) keeps every image's aspect ratio, its longest
    side scaled to ``image_size`` (masks: ``mask_size``) and the rest padded with zeros at the bottom and right,
    as SAM does; ``"stretch"`` scales both sides to the square. Every sample records its original ``size`` and,
    when padded, its ``pad`` ([bottom, right] at ``image_size``)."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        site: str,
        dataset: str,
        classes: Sequence[str],
        image_size: int = DEFAULT_IMAGE_SIZE,
        mask_size: int = DEFAULT_MASK_SIZE,
        settings: dict | None = None,
        overwrite: bool = False,
        intensity: str = "unit",
        mask_resize: str = DEFAULT_MASK_RESIZE,
        resize: str = PAD,
    ):
        if not 1 <= len(classes) <= MAX_CLASSES:
            raise DataError(f"classes is {list(classes)}; expected 1 to {MAX_CLASSES} names")
        if intensity not in UNIT_RULES:
            raise DataError(f"intensity is {intensity!r}; expected one of {', '.join(UNIT_RULES)}")
        if mask_resize not in MASK_RESIZES:
            raise DataError(f"mask_resize is {mask_resize!r}; expected one of {', '.join(MASK_RESIZES)}")
        if resize not in RESIZE_MODES:
            raise DataError(f"resize is {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
        if not str(site) or any(c in str(site) for c in "/\\"):
            raise DataError(f"site is {site!r}; expected a non-empty name without path separators")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise DataError(f"{self.out_dir}: a file is where the site folder goes; expected a folder path (the file is left alone)")
        if self.out_dir.exists() and not overwrite:
            raise DataError(f"{self.out_dir}: output already exists; expected a new folder (or overwrite=True to replace it)")
        self.partial = self.out_dir.with_name(self.out_dir.name + ".partial")
        self.site, self.dataset, self.classes = str(site), dataset, list(classes)
        self.image_size, self.mask_size = int(image_size), int(mask_size)
        self.settings = dict(settings or {})
        if intensity != "unit":
            self.settings.setdefault("writer_intensity", intensity)
        if mask_resize != DEFAULT_MASK_RESIZE:
            self.settings.setdefault("mask_resize", mask_resize)
        self.intensity = intensity
        self.mask_resize = mask_resize
        self.resize = resize
        self.overwrite = overwrite
        self.samples: list[SampleRecord] = []
        self._positive = 0
        self._open = False
        self._created: list[Path] = []  # parent folders this writer made, deepest first
        self._contrast: dict[str, bool] = {}  # volume -> any slice with contrast

    def __enter__(self) -> "SiteWriter":
        parent = self.out_dir.parent
        missing = []
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        if self.partial.exists() and not self.partial.is_dir():
            raise DataError(f"{self.partial}: a file is where the work-in-progress folder goes; "
                            f"expected nothing there (the file is left alone)")
        try:
            if self.partial.exists():
                shutil.rmtree(self.partial)  # left by an interrupted earlier run; never a finished output
            for folder in reversed(missing):
                folder.mkdir()
                self._created.insert(0, folder)
            (self.partial / "images").mkdir(parents=True)
            (self.partial / "masks").mkdir(parents=True)
        except OSError as exc:
            self._clean_up()
            where = exc.filename or self.out_dir.parent
            raise DataError(f"{where}: cannot create the site folder there ({exc.strerror or exc}); expected a writable folder") from None
        self._open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._open = False
        if exc_type is not None:
            self._clean_up()
            return
        try:
            self._finish()
        except BaseException:
            self._clean_up()
            raise

    def _clean_up(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        for folder in self._created:  # only empty ones: rmdir never removes anything that holds a file
            try:
                folder.rmdir()
            except OSError:
                break

    def add(self, image, mask, volume: str, slice_index: int | None = None, sample_id: str | None = None) -> str:
        """Add one 2D sample. ``image``: (H,W), (H,W,3) or (3,H,W) array, uint8 or float in [0,1] (see the
        class's ``intensity``); ``mask``: (C,H,W) or, for one class, (H,W) array of {0,1}. Resized to the site's
        sizes. A constant image is refused for a 2D sample (``slice_index`` None); a volume's slices may be
        constant (background above a body), but a volume whose every slice is constant draws a warning."""
        if not self._open:
            raise RuntimeError("SiteWriter.add() outside of a 'with' block")
        sample_id = sample_id or (f"{volume}_{slice_index:04d}" if slice_index is not None else str(volume))
        sample_id = str(sample_id).replace("/", "_").replace(os.sep, "_")
        where = f"sample {sample_id!r}"
        mask_np = np.asarray(mask)
        image_np = np.asarray(image)
        image_np = _image_to_chw(image_np, where)
        if mask_np.ndim == 2:
            mask_np = mask_np[None]
        if mask_np.ndim != 3 or mask_np.shape[0] != len(self.classes):
            raise DataError(f"{where}: mask has {mask_np.shape[0] if mask_np.ndim == 3 else mask_np.shape} channel(s); "
                            f"expected {len(self.classes)} for classes {self.classes}")
        if mask_np.shape[1:] != image_np.shape[1:]:
            raise DataError(f"{where}: mask shape {mask_np.shape[1:]} differs from image shape {image_np.shape[1:]}")
        if not np.isin(mask_np, (0, 1)).all():
            values = np.unique(mask_np)
            hint = " (a 0/255 mask: divide it by 255)" if set(values.tolist()) <= {0, 255} else ""
            raise DataError(f"{where}: mask values {values[:8].tolist()} are not binary; expected 0/1 per class{hint}")
        unit = intensity.to_unit_range(image_np, self.intensity, where)
        constant = intensity.constant_value(unit) is not None
        if constant and slice_index is None:
            intensity.check_content(unit, where, "image", allow_label_like=True)  # raises: a 2D image must show something
        volume_id = str(volume) if str(volume).startswith(f"{self.site}_") else f"{self.site}_{volume}"
        self._contrast[volume_id] = self._contrast.get(volume_id, False) or not constant
        height, width = unit.shape[1:]
        image_t = fit_image(torch.from_numpy(unit), self.image_size, self.resize).clamp(0, 1)
        mask_t = fit_mask(torch.from_numpy(mask_np.astype(np.float32)), self.mask_size, self.resize, self.mask_resize)
        pad = None
        if self.resize == PAD:
            h, w = content_shape(height, width, self.image_size)
            pad = [self.image_size - h, self.image_size - w]
        rec = SampleRecord(sample_id, volume_id, f"images/{sample_id}.png", f"masks/{sample_id}.png", slice_index,
                           [int(height), int(width)], pad)
        if (self.partial / rec.image).exists():
            raise DataError(f"{where} (volume {volume!r}): sample id {sample_id!r} is written twice; expected unique ids")
        try:
            Image.fromarray((image_t.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8), "RGB").save(self.partial / rec.image)
            Image.fromarray(pack_mask(mask_t.numpy()), "L").save(self.partial / rec.mask)
        except OSError as exc:
            raise DataError(f"{exc.filename or self.partial / rec.image}: could not write ({exc.strerror or exc}); "
                            f"nothing of site '{self.site}' was kept") from None
        self.samples.append(rec)
        self._positive += int(mask_t.sum() > 0)
        return sample_id

    def _finish(self) -> None:
        if not self.samples:
            raise DataError(f"{self.out_dir}: site '{self.site}' has no usable cases; nothing was written")
        flat = [v for v, contrast in self._contrast.items() if not contrast]
        if flat:
            print(f"warning: {self.out_dir}: every slice of volume(s) {', '.join(flat[:3])}{' ...' if len(flat) > 3 else ''} "
                  f"is constant; those samples carry no image information", file=sys.stderr, flush=True)
        volumes = {s.volume for s in self.samples}
        manifest = SiteManifest(
            site=self.site,
            dataset=self.dataset,
            classes=self.classes,
            image_size=self.image_size,
            mask_size=self.mask_size,
            samples=self.samples,
            settings=self.settings,
            resize=self.resize,
            counts={
                "volumes": len(volumes),
                "samples": len(self.samples),
                "positive_samples": self._positive,
                "positive_fraction": round(self._positive / len(self.samples), 4),
            },
        )
        try:
            (self.partial / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1))
        except OSError as exc:
            raise DataError(f"{self.partial / MANIFEST}: could not write ({exc.strerror or exc}); "
                            f"nothing of site '{self.site}' was kept") from None
        if self.out_dir.exists():
            trash = self.out_dir.with_name(self.out_dir.name + ".replaced")
            shutil.rmtree(trash, ignore_errors=True)
            self.out_dir.rename(trash)
            try:
                self.partial.rename(self.out_dir)
            except OSError as exc:
                trash.rename(self.out_dir)  # the previous output goes back where it was
                raise DataError(f"{self.out_dir}: could not replace it ({exc.strerror or exc}); the previous output is unchanged") from None
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                self.partial.rename(self.out_dir)
            except OSError as exc:
                raise DataError(f"{self.out_dir}: could not move the finished site into place ({exc.strerror or exc}); "
                                f"nothing was kept") from None
        self.manifest = manifest


def _image_to_chw(image: np.ndarray, where: str = "image") -> np.ndarray:
    """(H,W), (H,W,C) or (C,H,W) -> (3,H,W) in the input's own dtype (scaling happens afterwards)."""
    if image.ndim == 2:
        image = np.repeat(image[None], 3, axis=0)
    elif image.ndim == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3):
        image = np.moveaxis(image[..., :3], -1, 0)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise DataError(f"{where}: image shape {image.shape}; expected (H,W), (H,W,3) or (3,H,W)")
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise DataError(f"{where}: image dtype is {image.dtype}; expected uint8, or float in [0, 1]")
    return np.ascontiguousarray(image)


def summarize_sites(site_dirs: Iterable[str | os.PathLike]) -> list[dict]:
    """One row per site (site, volumes, samples, positive fraction) for the end-of-preparation summary."""
    rows = []
    for d in site_dirs:
        m = read_manifest(d)
        rows.append({"site": m.site, "dir": str(d), **m.counts})
    return rows
