"""Machinery shared by the dataset preparers: site discovery, the skip-or-raise policy for bad cases,
idempotent re-runs, 2D file reading (PNG/JPEG/BMP through Pillow, TIFF through tifffile), pairing images with
masks by file name (:func:`pair_files`), and the end-of-run summary.

Every preparer turns a raw download into ``OUT/<site>/`` folders in the format of
:mod:`fedfms.data.site_dataset`. The rules that make re-runs safe live here:

* a site whose output is complete, was made with the same settings and from the same raw files (the manifest
  records every file each case read: :mod:`fedfms.data.preparers.inputs`) is skipped ("already prepared");
* an existing output made with other settings or from other raw files (cases added, removed or edited), or a
  foreign folder in the way, is an error that says what differs, unless the caller asked to overwrite;
* a site is written to ``<site>.partial`` and renamed only once complete (SiteWriter), so an error or
  Ctrl-C never leaves something that looks finished.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from fedfms.data import intensity
from fedfms.data import volumes as vol
from fedfms.data.geometry import PAD, check_resize
from fedfms.data.preparers import inputs
from fedfms.data.site_dataset import DEFAULT_MASK_RESIZE, MASK_RESIZES, SiteWriter, read_manifest, summarize_sites
from fedfms.errors import ConfigError, DataError
from fedfms.progress import bar

# Bumped when a preparer's output changes for the same settings, so old outputs are not taken as current.
# 2: volume ids carry the site; intensity checks; the manifest records the raw files read.
PREPARER_VERSION = 2

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".npy")
TIFF_EXTS = (".tif", ".tiff")
# Mask files sometimes carry a suffix after the image's name (e.g. ``img01_mask.png``).
MASK_SUFFIXES = ("", "_mask", "_masks", "_seg", "_gt", "_label", "-mask")
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # Pillow modes of 16-bit / 32-bit / float images
PATIENTS_CSV = "patients.csv"

# Settings that describe where the data came from rather than how it was processed; a re-run from a
# moved raw folder is still the same preparation.
PROVENANCE_KEY = "source"


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def norm_name(name: str) -> str:
    """Folder-name key that ignores case and punctuation: 'ISBI_1.5' == 'isbi1.5' == 'ISBI 1.5'."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def visible(path: Path) -> bool:
    # macOS archives add '._x' / '.DS_Store' next to every file; they are never data.
    return not path.name.startswith(".")


def progress(items: Sequence, desc: str, unit: str = "case"):
    """A progress bar over ``items`` (:func:`fedfms.progress.bar`: drawn only when stderr is a terminal)."""
    return bar(items, desc=desc, unit=unit)


# ----------------------------------------------------------------------------------------------------
# site selection


def select_sites(requested: Iterable[str] | None, known: Sequence[str], dataset: str) -> list[str]:
    """Canonical site names for ``requested`` (default: all ``known``), matched by :func:`norm_name`."""
    if not requested:
        return list(known)
    by_key = {norm_name(s): s for s in known}
    chosen = []
    for name in requested:
        site = by_key.get(norm_name(name))
        if site is None:
            raise ConfigError(f"unknown site {name!r} for dataset {dataset}; expected some of {', '.join(known)}")
        if site not in chosen:
            chosen.append(site)
    return chosen


def find_site_dir(raw: Path, site: str, aliases: Sequence[str], dataset: str) -> Path:
    """The raw folder of ``site``: a direct child of ``raw`` whose name matches one of ``aliases``."""
    keys = {norm_name(a) for a in (site, *aliases)}
    matches = sorted(p for p in raw.iterdir() if p.is_dir() and visible(p) and norm_name(p.name) in keys)
    if len(matches) > 1:
        raise DataError(f"{raw}: folders {', '.join(p.name for p in matches)} all look like site {site}; expected exactly one")
    if not matches:
        found = sorted(p.name for p in raw.iterdir() if p.is_dir() and visible(p))
        raise DataError(
            f"{raw}: no folder for site {site} (accepted names: {', '.join(dict.fromkeys((site, *aliases)))}); "
            f"found {found or 'no folders'}; expected the {dataset} layout in docs/datasets.md (or restrict --sites)"
        )
    return matches[0]


# ----------------------------------------------------------------------------------------------------
# cases and the bad-case policy


@dataclass
class Sample:
    image: np.ndarray
    mask: np.ndarray
    volume: str
    slice_index: int | None = None
    sample_id: str | None = None


@dataclass
class Case:
    """One unit of raw data (a volume, an image, a PanNuke patch). ``load`` reads and validates the
    whole case before anything is written, so a bad case never contributes half its slices. ``files``: every
    raw file ``load`` reads (default: ``path``), recorded so a re-run notices when one changes."""

    id: str
    path: Path
    load: Callable[[], list[Sample]]
    files: tuple[Path, ...] = ()


@dataclass
class Problem:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class SiteSource:
    """What a preparer found for one site: its cases, and problems spotted while pairing files."""

    site: str
    root: Path
    cases: list[Case]
    problems: list[Problem] = field(default_factory=list)
    extra_files: dict[str, Path] = field(default_factory=dict)  # role -> file read for the whole site (patients.csv, ...)
    notes: dict = field(default_factory=dict)  # recorded under settings.source (e.g. how patient ids were found)
    advice: list[str] = field(default_factory=list)  # printed once the site is written (not when already prepared)


def write_site(
    source: SiteSource,
    *,
    out: Path,
    dataset: str,
    classes: Sequence[str],
    image_size: int,
    mask_size: int,
    settings: dict,
    overwrite: bool,
    skip_bad_cases: bool,
    resize: str = PAD,
) -> Path:
    """Write one site (or skip it when already prepared identically). Returns ``out/<site>``.

    ``resize``: how images become the square (:mod:`fedfms.data.geometry`): ``pad`` keeps their aspect ratio,
    ``stretch`` does not; the manifest records it, and a site prepared the other way is not "already prepared".

    Strict by default: a bad case raises DataError naming its file and nothing is written (files found unusable
    while pairing — an image without its mask, a mask without its image — are each named on a line of their
    own first).
    With ``skip_bad_cases`` each bad case is reported as a warning, left out, and listed in the
    manifest's ``settings.source.skipped``. Volume ids are ``<site>_<patient>`` (SiteWriter), so sites
    never share one."""
    site_dir = Path(out) / source.site
    settings = {"preparer": dataset, "preparer_version": PREPARER_VERSION, **settings}
    if site_dir.exists() and not site_dir.is_dir():
        raise DataError(f"{site_dir}: a file is where the site folder goes; expected a folder or nothing (move the file away)")
    if _already_prepared(site_dir, dataset, list(classes), image_size, mask_size, check_resize(resize), settings, source,
                         overwrite):
        return site_dir
    if source.problems and not skip_bad_cases:
        for p in source.problems[1:]:
            print(f"error: {p}", file=sys.stderr, flush=True)
        more = (f" [and {len(source.problems) - 1} more unusable file(s) of site '{source.site}', listed above]"
                if len(source.problems) > 1 else "")
        raise DataError(f"{source.problems[0]}{more} (use --skip-bad-cases to leave such cases out)")
    skipped = [{"file": str(p.path), "problem": p.message} for p in source.problems]
    for p in source.problems:
        warn(f"{p}; case skipped")
    if not source.cases:
        raise DataError(f"{source.root}: site '{source.site}' has no usable cases; expected the {dataset} layout in docs/datasets.md")

    try:
        record, _ = inputs.scan(source, with_hashes=True)
    except OSError as exc:
        raise DataError(f"{exc.filename or source.root}: cannot read ({exc.strerror or exc}); expected readable raw files") from None
    provenance = {"raw": str(source.root), "cases_found": len(source.cases) + len(source.problems),
                  "skip_bad_cases": skip_bad_cases, **source.notes, "inputs": record}
    with SiteWriter(site_dir, source.site, dataset, classes, image_size, mask_size, {**settings, PROVENANCE_KEY: provenance},
                    overwrite, resize=resize, mask_resize=settings.get("mask_resize", DEFAULT_MASK_RESIZE)) as writer:
        used = 0
        for case in progress(source.cases, desc=f"{dataset}/{source.site}"):
            try:
                samples = case.load()
            except DataError as exc:
                if not skip_bad_cases:
                    raise DataError(f"{exc} (use --skip-bad-cases to leave such cases out)") from None
                warn(f"{exc}; case skipped")
                skipped.append({"file": str(case.path), "problem": str(exc)})
                continue
            for s in samples:
                writer.add(s.image, s.mask, s.volume, s.slice_index, s.sample_id)
            used += bool(samples)
        if not writer.samples:
            detail = f" ({len(skipped)} bad case(s) skipped, first: {skipped[0]['problem']})" if skipped else " (no samples were selected)"
            raise DataError(f"{source.root}: site '{source.site}' has no usable cases{detail}; nothing was written")
        provenance.update(cases_used=used, skipped=skipped)
    info(f"{dataset}/{source.site}: wrote {len(writer.samples)} samples from {used} case(s) to {site_dir}")
    for line in source.advice:
        info(f"{dataset}/{source.site}: {line}")
    return site_dir


def write_sites(sites: Iterable[tuple[SiteSource, dict]], **write_kwargs) -> list[Path]:
    """:func:`write_site` for each ``(source, settings)`` pair; a lazy iterable finds and writes one site at a
    time, so a layout problem in a later site never delays writing the earlier ones. When a later site fails,
    the message says which sites are complete (they stay: re-running skips them)."""
    done: list[Path] = []
    try:
        for source, settings in sites:
            done.append(write_site(source, settings=settings, **write_kwargs))
    except DataError as exc:
        if not done:
            raise
        raise DataError(f"{exc} [site(s) {', '.join(p.name for p in done)} are complete in {done[0].parent}]") from None
    return done


def _normalise(obj):
    return json.loads(json.dumps(obj))


# Settings that manifests written before presets existed lack, and the value that was then implied: such an output
# was made under the project preset, with both slice ends and every PanNuke fold / MoNuSeg image kept.
IMPLIED_BEFORE_PRESETS = {"preset": "project", "skip_end_slices": False, "pannuke_folds": "all", "monuseg_subset": "all"}


# Settings a manifest may lack because it was written before the setting was recorded, and what was then done:
# masks were resized with "nearest-exact" before the rule became an option (the reference preset's "nearest").
IMPLIED_WHEN_MISSING = {"mask_resize": DEFAULT_MASK_RESIZE}


def check_mask_resize(rule) -> str:
    """The ``mask_resize`` option (:data:`fedfms.data.site_dataset.MASK_RESIZES`), or a ConfigError."""
    if rule not in MASK_RESIZES:
        raise ConfigError(f"mask_resize is {rule!r}; expected one of {', '.join(MASK_RESIZES)}")
    return rule


def _from_before_presets(old: dict, new: dict) -> dict:
    """``old`` settings of a manifest written before presets existed, in today's form, so an unchanged preparation
    is still "already prepared" (FeTS then recorded ``target_label: 4`` for today's ``target_labels: [4]``)."""
    if "preset" in old or "preset" not in new:
        return old
    old = dict(old)
    if "target_label" in old and "target_labels" not in old:
        old["target_labels"] = [old.pop("target_label")]
    for key, value in IMPLIED_BEFORE_PRESETS.items():
        if key in new and key not in old:
            old[key] = value
    return old


def _already_prepared(site_dir: Path, dataset: str, classes: list, image_size: int, mask_size: int, resize: str,
                      settings: dict, source: SiteSource, overwrite: bool) -> bool:
    if not site_dir.exists() or overwrite:
        return False  # nothing there, or SiteWriter replaces it atomically
    try:
        m = read_manifest(site_dir)
    except DataError as exc:
        raise DataError(f"{site_dir}: output exists but is not a complete prepared site ({exc}); pass --overwrite to replace it") from None
    # a manifest without "resize" was written when every image was stretched (read_manifest says so)
    old = {"dataset": m.dataset, "classes": m.classes, "image_size": m.image_size, "mask_size": m.mask_size, "resize": m.resize}
    new = {"dataset": dataset, "classes": classes, "image_size": image_size, "mask_size": mask_size, "resize": resize}
    new_settings = {k: v for k, v in _normalise(settings).items() if k != PROVENANCE_KEY}
    old_settings = _from_before_presets({k: v for k, v in m.settings.items() if k != PROVENANCE_KEY}, new_settings)
    old_settings = {**{k: v for k, v in IMPLIED_WHEN_MISSING.items() if k in new_settings}, **old_settings}
    diffs = [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if old[k] != new[k]]
    diffs += [
        f"{k} {old_settings.get(k)!r} -> {new_settings.get(k)!r}"
        for k in sorted(set(old_settings) | set(new_settings))
        if old_settings.get(k) != new_settings.get(k)
    ]
    if diffs:
        raise DataError(f"{site_dir}: already prepared with different settings ({'; '.join(diffs)}); pass --overwrite to replace it")
    provenance = m.settings.get(PROVENANCE_KEY) if isinstance(m.settings.get(PROVENANCE_KEY), dict) else {}
    recorded = provenance.get("inputs")
    old_raw = provenance.get("raw", "?")
    if not isinstance(recorded, dict):
        raise DataError(f"{site_dir}: the manifest records no raw inputs, so it cannot be checked against {source.root}; "
                        f"pass --overwrite to re-prepare it")
    try:
        changed = inputs.changes(recorded, source)
    except OSError as exc:
        raise DataError(f"{exc.filename or source.root}: cannot read ({exc.strerror or exc}); expected readable raw files") from None
    moved = str(source.root) != old_raw
    if changed:
        origin = f"{old_raw} -> {source.root}" if moved else str(source.root)
        raise DataError(f"{site_dir}: raw inputs differ from the ones it was prepared from ({origin}: {'; '.join(changed)}); "
                        f"pass --overwrite to re-prepare it")
    left_out = len(provenance.get("skipped") or [])
    notes = []
    if moved:
        notes.append(f"prepared from {old_raw}; the files under {source.root} are identical")
    if left_out:
        notes.append(f"{left_out} bad case(s) were left out, listed in its manifest")
    info(f"{dataset}/{m.site}: already prepared in {site_dir}{' (' + '; '.join(notes) + ')' if notes else ''}; skipped")
    return True


# ----------------------------------------------------------------------------------------------------
# volumes -> samples


def volume_samples(
    image: np.ndarray,
    target: np.ndarray,
    volume_id: str,
    *,
    low_pct: float,
    high_pct: float,
    empty_keep,
    two_and_half_d: bool,
    skip_end_slices: bool = False,
    path: Path | str = "volume",
    sample_prefix: str | None = None,
) -> list[Sample]:
    """Window a volume and cut it into depth slices; ``target`` is the binary mask volume (H, W, D), or one per
    class (C, H, W, D). Which slices are kept: :func:`fedfms.data.volumes.select_slices` (a slice "has target" when
    any class is present). A volume without contrast (constant, a label map, an empty window) is refused naming
    ``path``. Sample ids are ``<volume_id>_<slice>`` or, given ``sample_prefix``, ``<sample_prefix>_<slice>``
    (when several volumes share one patient id)."""
    windowed = vol.window_volume(image, low_pct, high_pct, path)
    target = np.asarray(target)
    keep = vol.select_slices(target.reshape(-1, target.shape[-1]).any(axis=0), empty_keep, skip_end_slices)
    samples = []
    for k in keep:
        img = vol.neighbour_stack(windowed, k) if two_and_half_d else windowed[:, :, k]
        samples.append(Sample(img, target[..., k].astype(np.uint8), volume_id, k,
                              f"{sample_prefix}_{k:04d}" if sample_prefix else None))
    return samples


def check_labels(seg: np.ndarray, allowed: Iterable[int], path: Path, meaning: str) -> None:
    values = np.unique(seg)
    unexpected = sorted(set(values.tolist()) - set(allowed))
    if unexpected:
        raise DataError(f"{path}: unexpected label values {unexpected[:8]}; expected only {sorted(allowed)} ({meaning})")


# ----------------------------------------------------------------------------------------------------
# 2D files


def _open_image(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()  # decode now: a truncated file fails here, not half-way through resizing
        return im
    except PermissionError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror}); expected a readable image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc}); "
                        f"expected a valid {path.suffix.lstrip('.').upper() or 'image'} file") from None


def _read_tiff(path: Path) -> np.ndarray:
    """A TIFF's pixels as stored (tifffile: 8/16/32-bit, float, RGB, planar RGB): (H, W) or (H, W, C)."""
    import tifffile

    try:
        arr = np.asarray(tifffile.imread(path))
    except PermissionError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror}); expected a readable TIFF") from None
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, tifffile.TiffFileError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc}); expected a valid TIFF file") from None
    while arr.ndim > 2 and arr.shape[0] == 1:  # a single page or plane stored with its own axis
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (separate) RGB
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4)):
        raise DataError(f"{path}: TIFF holds an array of shape {arr.shape} (several pages, planes or channels); "
                        f"expected one 2D image (H, W), (H, W, 3) or (H, W, 4)")
    return arr


def read_pixels(path: Path) -> tuple[np.ndarray, str]:
    """A 2D image file's pixels as stored, (H, W) or (H, W, C) with C = 1 or 3 (alpha dropped), and a phrase saying
    what it is (``image mode I;16``, ``image is uint16``). PNG, JPEG, BMP through Pillow (8-bit modes as RGB); TIFF
    through tifffile (8/16/32-bit, float, planar RGB)."""
    if path.suffix.lower() in TIFF_EXTS:
        arr = _read_tiff(path)
        kind = f"image is {arr.dtype}"
    else:
        im = _open_image(path)
        kind = f"image mode {im.mode}"
        arr = np.asarray(im) if im.mode in HIGH_BIT_MODES else np.asarray(im.convert("RGB"))
    if arr.ndim == 3:
        arr = arr[..., :1] if arr.shape[-1] in (1, 2) else arr[..., :3]  # grey(+alpha) / RGB(+alpha)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return arr, kind


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1 or 3) -> (H, W, 3)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def read_image(path: Path, window: tuple[float, float] | None = None,
               fix: str = "convert it to 8 bits first, choosing the intensity window yourself",
               allow_label_like: bool = False) -> np.ndarray:
    """A 2D image file (:func:`read_pixels`) -> (H, W, 3): uint8 as stored, or float32 in [0, 1] when ``window`` =
    (low, high) percentiles maps each image's own intensity range.

    A 16-bit, 32-bit or float image has no rule that maps it to 8 bits without a choice, so it is refused unless
    ``window`` is given (``fix`` says what the caller can do). Refused too: NaN, constant and (unless
    ``allow_label_like``) mask-like images (:mod:`fedfms.data.intensity`)."""
    arr, kind = read_pixels(path)
    if arr.dtype != np.uint8 and window is None:
        raise DataError(f"{path}: {kind} (16-bit or float); expected an 8-bit grey or RGB image ({fix})")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise DataError(f"{path}: image has NaN/inf values; expected finite intensities")
    intensity.check_content(arr, str(path), "image", allow_label_like)
    if window is not None:
        arr = intensity.window(arr, window[0], window[1], where=str(path))
    return to_rgb(arr)


def read_label_image(path: Path, palette: str = "index", colour: str = "error") -> np.ndarray:
    """Read a mask file as a 2D integer array.

    ``palette``: how palette ('P') PNG/BMP/GIF masks are read — ``"index"`` keeps the stored indices
    (instance/class ids), ``"grey"`` takes the grey level of each palette colour (REFUGE-style masks).
    ``colour``: an RGB mask whose channels differ is an error (``"error"``), or reduced to the channel
    maximum (``"max"``, enough to binarise colour-coded instance masks). ``.npy`` masks: (H, W) or
    (H, W, C), reduced over C by maximum. TIFF masks (8/16/32-bit) through tifffile."""
    if path.suffix.lower() == ".npy":
        arr = load_npy(path)
        if arr.ndim == 3:
            arr = arr.max(axis=-1)
        if arr.ndim != 2:
            raise DataError(f"{path}: mask array has shape {arr.shape}; expected (H, W) or (H, W, C)")
        return _integral(arr, path)
    if path.suffix.lower() in TIFF_EXTS:
        arr = _read_tiff(path)
        if arr.ndim == 3:
            arr = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
            same = (arr == arr[..., :1]).all()
            if not same and colour == "error":
                raise DataError(f"{path}: colour mask (RGB channels differ); expected a grey-level label image")
            arr = arr[..., 0] if same else arr.max(axis=-1)
        return _integral(arr, path)
    im = _open_image(path)
    if im.mode == "P":
        arr = np.asarray(im.convert("L")) if palette == "grey" else np.asarray(im)
    elif im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        rgb = np.asarray(im.convert("RGB"))
        same = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        if not same and colour == "error":
            raise DataError(f"{path}: colour mask (RGB channels differ); expected a grey-level label image")
        arr = rgb[..., 0] if same else rgb.max(axis=-1)
    else:
        arr = np.asarray(im)
    return _integral(np.asarray(arr), path)


def _integral(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or (arr != np.floor(arr)).any():
            raise DataError(f"{path}: mask has non-integer values; expected integer labels")
    return arr.astype(np.int64)


def load_npy(path: Path, mmap: bool = False, allow_pickle: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=allow_pickle)
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing; expected a NumPy .npy array") from None
    except PermissionError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror}); expected a readable NumPy .npy array") from None
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable or truncated .npy file ({exc}); expected a complete NumPy array") from None


def rasterise_xml(path: Path, height: int, width: int) -> np.ndarray:
    """MoNuSeg/Aperio-style XML (``Region/Vertices/Vertex X= Y=``) -> (H, W) mask of filled polygons."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: unreadable XML annotation ({exc}); expected Aperio-style Region/Vertex polygons") from None
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    regions = 0
    for region in root.iter("Region"):
        try:
            pts = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        except (TypeError, ValueError):
            raise DataError(f"{path}: a Vertex lacks numeric X/Y; expected <Vertex X=\"..\" Y=\"..\"/>") from None
        if len(pts) >= 3:  # fewer cannot enclose a nucleus
            draw.polygon(pts, fill=1, outline=1)
            regions += 1
    if regions == 0:
        warn(f"{path}: no polygon regions; the mask is empty")
    return np.asarray(canvas).astype(np.int64)


def list_files(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    """stem -> file for the files in ``folder`` with one of ``exts``; two files with one stem is an error."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and visible(p) and p.suffix.lower() in exts:
            if p.stem in out:
                raise DataError(f"{folder}: files {out[p.stem].name} and {p.name} share the id {p.stem!r}; expected one file per id")
            out[p.stem] = p
    return out


@dataclass(frozen=True)
class Pair:
    """An image and its mask file(s): one file holding every class, or one file per class in class order."""

    id: str
    image: Path
    masks: tuple[Path, ...]
    per_class: bool = False


def _names_of(paths) -> str:
    return ", ".join(p.name for p in paths)


def pair_files(images: dict[str, Path], masks: dict[str, Path], classes: Sequence[str] | None = None,
               suffixes: Sequence[str] = MASK_SUFFIXES, ids=lambda stem: (stem,)) -> tuple[list[Pair], list[Problem]]:
    """Pair images with masks by file name (keys: file names without their extension); docs/data-format.md.

    The mask of image ``<id>`` is ``<id><suffix>`` for one of ``suffixes`` (``<id>``, ``<id>_mask``, ...) — one file
    holding every class. With several ``classes`` it may instead be one file per class, ``<id>_<class>`` for every
    class; with one class, ``<id>_<class>`` is its mask file too. ``ids(stem)``: the names an image's masks may be
    keyed by (e.g. nnU-Net's ``case_0000`` image and ``case`` label). Every image without exactly one of these, and
    every mask no image claims, is a :class:`Problem` naming that file."""
    classes = list(classes or [])
    single_suffixes = list(dict.fromkeys([*suffixes, *([f"_{classes[0]}"] if len(classes) == 1 else [])]))
    pairs, problems, used = [], [], set()
    for stem, image in images.items():
        bases = list(dict.fromkeys(ids(stem)))
        single = list(dict.fromkeys(b + s for b in bases for s in single_suffixes if b + s in masks))
        per: dict[str, str] = {}
        per_base = bases[0]
        if len(classes) > 1:
            for per_base in bases:
                per = {c: f"{per_base}_{c}" for c in classes if f"{per_base}_{c}" in masks}
                if per:
                    break
        used.update(single, per.values())
        if single and per:
            per_files = _names_of(masks[k] for k in per.values())
            problems.append(Problem(image, f"has both a mask file holding every class ({masks[single[0]].name}) and "
                                           f"per-class mask files ({per_files}); expected one or the other"))
        elif len(single) > 1:
            problems.append(Problem(image, f"has several mask files ({_names_of(masks[k] for k in single)}); expected exactly one"))
        elif single:
            pairs.append(Pair(stem, image, (masks[single[0]],)))
        elif per:
            missing = [c for c in classes if c not in per]
            if missing:
                problems.append(Problem(image, f"per-class mask files {_names_of(masks[k] for k in per.values())} lack class(es) "
                                               f"{', '.join(missing)}; expected {', '.join(f'{per_base}_{c}.<ext>' for c in missing)} "
                                               f"in the masks folder"))
            else:
                pairs.append(Pair(stem, image, tuple(masks[per[c]] for c in classes), True))
        else:
            per_class = f", or one file per class ({', '.join(f'{bases[0]}_{c}' for c in classes)})" if len(classes) > 1 else ""
            problems.append(Problem(image, f"image has no mask file with the same name; expected {bases[0]}.<ext> "
                                           f"(or {bases[0]}_mask.<ext>){per_class} in the masks folder"))
    for key in sorted(set(masks) - used):
        problems.append(Problem(masks[key], "mask has no image with the same name; expected an image named like it "
                                            "(without a _mask/_<class> suffix) in the images folder"))
    return pairs, problems


def load_patient_map(site_dir: Path) -> dict[str, str]:
    """Optional ``<site>/patients.csv`` (columns ``image,patient``) grouping images by patient, for 2D
    datasets whose file names do not say which images come from the same person."""
    path = site_dir / PATIENTS_CSV
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            if "image" not in fields or "patient" not in fields:
                raise DataError(f"{path}: columns are {fields}; expected 'image,patient'")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc}); expected columns image,patient") from None
    mapping = {}
    for i, row in enumerate(rows, start=2):
        if not row.get("image") or not row.get("patient"):
            raise DataError(f"{path}: line {i} has an empty image or patient; expected both")
        mapping[vol.nifti_stem(row["image"]) or Path(row["image"]).stem] = row["patient"]
    return mapping


# ----------------------------------------------------------------------------------------------------
# summary


def print_summary(dataset: str, site_dirs: Sequence[Path], file=None) -> list[dict]:
    rows = summarize_sites(site_dirs)
    file = file or sys.stdout
    header = ("site", "volumes", "samples", "positive", "positive_frac")
    table = [header] + [
        (r["site"], str(r.get("volumes", "?")), str(r.get("samples", "?")), str(r.get("positive_samples", "?")),
         f"{r.get('positive_fraction', 0):.3f}")
        for r in rows
    ]
    if rows:
        tot_s = sum(r.get("samples", 0) for r in rows)
        tot_p = sum(r.get("positive_samples", 0) for r in rows)
        table.append(("total", str(sum(r.get("volumes", 0) for r in rows)), str(tot_s), str(tot_p), f"{tot_p / max(tot_s, 1):.3f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"{dataset}: {len(rows)} site(s) ready", file=file)
    for j, row in enumerate(table):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))), file=file)
    return rows
