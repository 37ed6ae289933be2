"""A hospital's own data, as it comes: ``fedfms prepare images`` (2D) and ``fedfms prepare volumes`` (3D NIfTI).

Raw layout (docs/data-format.md, "Your own data")::

    RAW/<site>/images/<id>.{png,jpg,jpeg,tif,tiff,bmp}     (volumes: <id>.nii.gz or .nii)
    RAW/<site>/masks/<id>.{png,tif,tiff,bmp,gif,npy}       (volumes: RAW/<site>/labels/<id>.nii.gz)
    RAW/<site>/patients.csv                                optional: image,patient (which files are one patient)

Every subfolder of ``RAW`` is a site (``--sites`` picks some), named after the folder. A mask is paired with its
image by name: ``<id>`` (or ``<id>_mask``, ``_seg``, ...) holds every class; with several ``--classes`` it may be
one file per class instead, ``<id>_<class>``. Mask values: one class 0/255 or 0/1; several classes index-coded
(0 background, k the k-th class); per-class files 0/255 or 0/1 each; ``--mask-coding instances``: every id > 0.
Images: 8-bit grey/RGB as they are; 16-bit and float images need ``--window`` (each image's own 1st..99th
percentile -> [0, 1]). Volumes are windowed per volume and sliced along the last axis, as the public 3D datasets.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from fedfms.data import volumes as vol
from fedfms.data.geometry import PAD, check_resize
from fedfms.data.preparers import common, layout
from fedfms.errors import ConfigError, DataError

LAYOUT_2D = "RAW/<site>/images/ and RAW/<site>/masks/, see docs/data-format.md"
LAYOUT_3D = "RAW/<site>/images/ and RAW/<site>/labels/ with NIfTI files, see docs/data-format.md"
WINDOW_FIX = "pass --window to map each image's own 1st..99th percentile to [0, 1]"


def find_sites(raw: Path, requested, dataset: str, masks: str) -> dict[str, Path]:
    """Site name -> folder: every visible subfolder of ``raw`` (or those ``requested``, matched ignoring case and
    punctuation). A subfolder without ``images/`` and ``<masks>/`` is an error naming it, so no site is quietly
    left out."""
    folders = {p.name: p for p in sorted(raw.iterdir()) if p.is_dir() and common.visible(p)}
    if not folders:
        raise DataError(f"{raw}: no site folders; expected one folder per site holding images/ and {masks}/")
    chosen = common.select_sites(requested, list(folders), dataset)
    for site in chosen:
        dirs = layout.subfolders(folders[site])
        if "images" not in dirs or masks not in dirs:
            raise DataError(f"{folders[site]}: subfolders are {sorted(p.name for p in dirs.values()) or 'none'}; expected "
                            f"images/ and {masks}/ (every folder of --raw is a site; restrict them with --sites)")
    return {s: folders[s] for s in chosen}


def _patients(site_dir: Path) -> tuple[dict[str, str], dict[str, Path]]:
    csv = site_dir / common.PATIENTS_CSV
    return common.load_patient_map(site_dir), ({common.PATIENTS_CSV: csv} if csv.is_file() else {})


def _coding_text(classes: list[str], coding: str) -> str:
    if coding == "instances":
        return f"instance id > 0 -> {classes[0]}"
    if len(classes) == 1:
        return f"0/255 or 0/1 -> {classes[0]}; per-class file <id>_{classes[0]}"
    return ("index " + ", ".join(f"{k + 1} -> {c}" for k, c in enumerate(classes))
            + "; or one 0/255 file per class <id>_<class>")


def prepare_images(
    raw: Path,
    out: Path,
    *,
    image_size: int = 1024,
    mask_size: int = 256,
    overwrite: bool = False,
    sites=None,
    classes=None,
    mask_coding: str = "auto",
    window: bool = False,
    low_pct: float | None = None,
    high_pct: float | None = None,
    resize: str = PAD,
    skip_bad_cases: bool = False,
) -> list[Path]:
    """Prepare every site of a 2D dataset laid out as in the module docstring. ``classes``: names (default one class,
    ``foreground``); ``window``: map each image's own ``low_pct``..``high_pct`` percentile (default 1..99) to
    [0, 1] (needed for 16-bit and float images); ``resize``: ``pad`` keeps the aspect ratio (default), ``stretch``
    does not."""
    raw, out = Path(raw), Path(out)
    names = layout.parse_classes(classes)
    layout.check_coding(mask_coding, names)
    check_resize(resize)
    if not window and (low_pct is not None or high_pct is not None):
        raise ConfigError("--low-pct/--high-pct set the per-image window of 2D images; pass --window too")
    bounds = (1.0 if low_pct is None else float(low_pct), 99.0 if high_pct is None else float(high_pct))
    if window:
        vol.check_percentiles(*bounds)
    site_dirs = find_sites(raw, sites, "images", "masks")
    recipe = layout.ImageRecipe(
        tuple(names), partial(layout.classes_from_labels, classes=names, coding=mask_coding),
        read_mask=lambda path, _size: common.read_label_image(path, palette="index", colour="error"),
        window=bounds if window else None, window_fix=WINDOW_FIX,
    )
    settings = {
        "layout": "images + masks per site",
        "mask_coding": mask_coding,
        "label_map": _coding_text(names, mask_coding),
        "intensity": (f"per-image window {bounds[0]:g}..{bounds[1]:g} percentile -> [0, 1]" if window
                      else "8-bit / 255"),
    }

    def source(site: str) -> common.SiteSource:
        site_dir = site_dirs[site]
        # JPEG masks are read too (and refused when compression has blurred their values)
        pairs, problems = layout.find_image_pairs(site_dir, names, mask_exts=(*common.MASK_EXTS, ".jpg", ".jpeg"),
                                                  layout=LAYOUT_2D)
        patients, extra = _patients(site_dir)
        cases = [layout.image_case(p, patients.get(p.id, p.id), recipe) for p in pairs]
        grouped = sum(p.id in patients for p in pairs)
        advice = [] if extra else [f"no {common.PATIENTS_CSV}, so each image is its own patient (to keep tiles of one slide "
                                   f"on one side of the train/val split, list them in {site_dir / common.PATIENTS_CSV})"]
        notes = {"patient_ids": {"patients.csv": grouped, "own image": len(pairs) - grouped}}
        return common.SiteSource(site, site_dir, cases, problems, extra_files=extra, notes=notes, advice=advice)

    return common.write_sites(
        ((source(site), settings) for site in site_dirs),
        out=out, dataset="images", classes=names, image_size=image_size, mask_size=mask_size,
        overwrite=overwrite, skip_bad_cases=skip_bad_cases, resize=resize,
    )


def prepare_volumes(
    raw: Path,
    out: Path,
    *,
    image_size: int = 1024,
    mask_size: int = 256,
    overwrite: bool = False,
    sites=None,
    classes=None,
    mask_coding: str = "auto",
    low_pct: float = 1.0,
    high_pct: float = 99.0,
    empty_slices_keep="all",
    two_and_half_d: bool = False,
    skip_end_slices: bool = False,
    resize: str = PAD,
    skip_bad_cases: bool = False,
) -> list[Path]:
    """Prepare every site of a 3D NIfTI dataset (``RAW/<site>/images/`` + ``labels/``): each volume windowed between
    its own ``low_pct`` and ``high_pct`` percentile and sliced along its last axis, as the public 3D datasets
    (options as ``fedfms prepare prostate``); classes and mask codings as :func:`prepare_images`."""
    raw, out = Path(raw), Path(out)
    names = layout.parse_classes(classes)
    layout.check_coding(mask_coding, names)
    check_resize(resize)
    vol.check_percentiles(low_pct, high_pct)
    empty_keep = vol.parse_empty_keep(empty_slices_keep)
    site_dirs = find_sites(raw, sites, "volumes", "labels")
    recipe = layout.VolumeRecipe(
        tuple(names), partial(layout.classes_from_labels, classes=names, coding=mask_coding),
        low_pct=float(low_pct), high_pct=float(high_pct), empty_keep=empty_keep, two_and_half_d=bool(two_and_half_d),
        skip_end_slices=bool(skip_end_slices),
    )
    settings = {
        "layout": "images + labels per site",
        "mask_coding": mask_coding,
        "label_map": _coding_text(names, mask_coding),
        "low_pct": float(low_pct),
        "high_pct": float(high_pct),
        "empty_slices_keep": "all" if empty_keep is None else empty_keep,
        "two_and_half_d": bool(two_and_half_d),
        "skip_end_slices": bool(skip_end_slices),
    }

    def source(site: str) -> common.SiteSource:
        site_dir = site_dirs[site]
        pairs, problems = layout.find_volume_pairs(site_dir, names)
        patients, extra = _patients(site_dir)
        # slices are named after their volume's file, so two volumes of one patient never share a sample id
        cases = [layout.volume_case(p.id, p.image, p.masks, patients.get(p.id, p.id), recipe, p.per_class, p.id)
                 for p in pairs]
        return common.SiteSource(site, site_dir, cases, problems, extra_files=extra)

    return common.write_sites(
        ((source(site), settings) for site in site_dirs),
        out=out, dataset="volumes", classes=names, image_size=image_size, mask_size=mask_size,
        overwrite=overwrite, skip_bad_cases=skip_bad_cases, resize=resize,
    )
