"""Retinal fundus optic disc / optic cup: REFUGE, ORIGA, G1020, Drishti-GS1.

Raw layout (docs/datasets.md)::

    RAW/<SITE>/images/<id>.{jpg,jpeg,png,tif,bmp}
    RAW/<SITE>/masks/<id>.{png,bmp,tif}          (or <id>_mask.png, ...; same id as the image)
    RAW/<SITE>/patients.csv                      optional: image,patient (groups images per patient)

Masks use the REFUGE grey-level coding by default (0 = cup, 128 = disc rim, 255 = background);
``mask_coding='index'`` reads 0 = background, 1 = disc rim, 2 = cup instead.

Output classes: channel 0 ``disc``, channel 1 ``cup``. By default the disc channel is the whole optic
disc *including* the cup (the clinical definition used for the cup-to-disc ratio and by the REFUGE
evaluation); ``disc_includes_cup=False`` makes it the rim only, so the two channels do not overlap. The paper's
code used the rim (``--preset reference``, :mod:`fedfms.data.preparers.presets`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from fedfms.data.preparers import common, presets
from fedfms.errors import ConfigError, DataError

DATASET = "fundus"
CLASSES = ["disc", "cup"]
SITES = {
    "REFUGE": ("REFUGE",),
    "ORIGA": ("ORIGA",),
    "G1020": ("G1020",),
    "Drishti-GS1": ("Drishti-GS1", "Drishti-GS", "DrishtiGS1", "Drishti_GS1", "Drishti"),
}
# coding -> (background, rim, cup) values and how palette masks are read
CODINGS = {
    "refuge": ((255, 128, 0), "grey"),
    "index": ((0, 1, 2), "index"),
}


def find_cases(site: str, site_dir: Path, load) -> common.SiteSource:
    subdirs = {common.norm_name(p.name): p for p in site_dir.iterdir() if p.is_dir() and common.visible(p)}
    if "images" not in subdirs or "masks" not in subdirs:
        raise DataError(
            f"{site_dir}: subfolders are {sorted(p.name for p in subdirs.values()) or 'none'}; "
            f"expected images/ and masks/ (see docs/datasets.md for converting the {site} release)"
        )
    images = common.list_files(subdirs["images"], common.IMAGE_EXTS)
    masks = common.list_files(subdirs["masks"], common.MASK_EXTS)
    patients = common.load_patient_map(site_dir)
    pairs, problems = common.pair_by_stem(images, masks)
    cases = [common.Case(stem, image, partial(load, image, mask, stem, patients.get(stem, stem)), (image, mask))
             for stem, image, mask in pairs]
    extra = {common.PATIENTS_CSV: site_dir / common.PATIENTS_CSV} if (site_dir / common.PATIENTS_CSV).is_file() else {}
    return common.SiteSource(site, site_dir, cases, problems, extra_files=extra)


def _load_case(image_path: Path, mask_path: Path, stem: str, patient: str, *, coding: str, disc_includes_cup: bool) -> list[common.Sample]:
    (bg_v, rim_v, cup_v), palette = CODINGS[coding]
    image = common.read_rgb(image_path)
    labels = common.read_label_image(mask_path, palette=palette, colour="error")
    if labels.shape != image.shape[:2]:
        raise DataError(f"{mask_path}: mask size {labels.shape} differs from image {image_path.name} size {image.shape[:2]}; "
                        f"expected the same height and width")
    other = "index" if coding == "refuge" else "refuge"
    common.check_labels(
        labels, (bg_v, rim_v, cup_v), mask_path,
        f"{coding} coding: {bg_v} background, {rim_v} disc rim, {cup_v} cup; try --mask-coding {other}",
    )
    if not (labels == bg_v).any():
        raise DataError(f"{mask_path}: no background pixels (value {bg_v}); expected {coding} coding — "
                        f"is the mask coded differently? try --mask-coding {other}")
    cup = labels == cup_v
    disc = (labels == rim_v) | cup if disc_includes_cup else labels == rim_v
    return [common.Sample(image, np.stack([disc, cup]).astype(np.uint8), patient, None, stem)]


def prepare_fundus(
    raw: Path,
    out: Path,
    *,
    image_size: int = 1024,
    mask_size: int = 256,
    overwrite: bool = False,
    sites=None,
    disc_includes_cup: bool = True,
    mask_coding: str = "refuge",
    skip_bad_cases: bool = False,
    mask_resize: str = common.DEFAULT_MASK_RESIZE,
    preset: str = presets.PROJECT,
) -> list[Path]:
    """Prepare the fundus sites; classes ``["disc", "cup"]`` (see the module docstring). ``mask_resize``: the
    masks' nearest-neighbour rule (``"nearest-exact"``, or ``"nearest"`` = OpenCV's INTER_NEAREST)."""
    raw, out = Path(raw), Path(out)
    if mask_coding not in CODINGS:
        raise ConfigError(f"mask_coding is {mask_coding!r}; expected one of {sorted(CODINGS)}")
    mask_resize = common.check_mask_resize(mask_resize)
    presets.check(DATASET, presets.check_name(preset), {"disc_includes_cup": bool(disc_includes_cup), "mask_resize": mask_resize})
    chosen = common.select_sites(sites, list(SITES), DATASET)
    site_dirs = {s: common.find_site_dir(raw, s, SITES[s], DATASET) for s in chosen}
    settings = {
        "preset": preset,
        "mask_coding": mask_coding,
        "disc_includes_cup": bool(disc_includes_cup),
        "mask_resize": mask_resize,
        "intensity": "RGB / 255",
    }
    load = partial(_load_case, coding=mask_coding, disc_includes_cup=bool(disc_includes_cup))
    return common.write_sites(
        ((find_cases(site, site_dirs[site], load), settings) for site in chosen),
        out=out, dataset=DATASET, classes=CLASSES, image_size=image_size, mask_size=mask_size,
        overwrite=overwrite, skip_bad_cases=skip_bad_cases,
    )
