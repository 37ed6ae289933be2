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

A layout over the general image importer (:mod:`fedfms.data.preparers.layout`): the same pairing and checks as
``fedfms prepare images``, with the REFUGE/index coding as its mask-to-class mapping.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from fedfms.data.geometry import PAD, check_resize
from fedfms.data.preparers import common, layout, presets
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


def find_cases(site: str, site_dir: Path, recipe: layout.ImageRecipe) -> common.SiteSource:
    """The site's image pairs (one coded mask file per image) as cases; patients from ``patients.csv``."""
    pairs, problems = layout.find_image_pairs(site_dir, layout=f"see docs/datasets.md for converting the {site} release")
    patients = common.load_patient_map(site_dir)
    cases = [layout.image_case(p, patients.get(p.id, p.id), recipe) for p in pairs]
    extra = {common.PATIENTS_CSV: site_dir / common.PATIENTS_CSV} if (site_dir / common.PATIENTS_CSV).is_file() else {}
    return common.SiteSource(site, site_dir, cases, problems, extra_files=extra)


def to_classes(labels: np.ndarray, mask_path: Path, *, coding: str, disc_includes_cup: bool) -> np.ndarray:
    """A coded fundus mask -> (2, H, W): disc (with or without the cup), cup."""
    bg_v, rim_v, cup_v = CODINGS[coding][0]
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
    return np.stack([disc, cup]).astype(np.uint8)


def recipe(coding: str, disc_includes_cup: bool) -> layout.ImageRecipe:
    palette = CODINGS[coding][1]
    return layout.ImageRecipe(
        tuple(CLASSES), partial(to_classes, coding=coding, disc_includes_cup=disc_includes_cup),
        read_mask=lambda path, _size: common.read_label_image(path, palette=palette, colour="error"),
    )


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
    resize: str = PAD,
) -> list[Path]:
    """Prepare the fundus sites; classes ``["disc", "cup"]`` (see the module docstring). ``mask_resize``: the
    masks' nearest-neighbour rule (``"nearest-exact"``, or ``"nearest"`` = OpenCV's INTER_NEAREST)."""
    raw, out = Path(raw), Path(out)
    if mask_coding not in CODINGS:
        raise ConfigError(f"mask_coding is {mask_coding!r}; expected one of {sorted(CODINGS)}")
    mask_resize = common.check_mask_resize(mask_resize)
    presets.check(DATASET, presets.check_name(preset), {"disc_includes_cup": bool(disc_includes_cup), "mask_resize": mask_resize,
                                                         "resize": check_resize(resize)})
    chosen = common.select_sites(sites, list(SITES), DATASET)
    site_dirs = {s: common.find_site_dir(raw, s, SITES[s], DATASET) for s in chosen}
    settings = {
        "preset": preset,
        "mask_coding": mask_coding,
        "disc_includes_cup": bool(disc_includes_cup),
        "mask_resize": mask_resize,
        "intensity": "RGB / 255",
    }
    how = recipe(mask_coding, bool(disc_includes_cup))
    return common.write_sites(
        ((find_cases(site, site_dirs[site], how), settings) for site in chosen),
        out=out, dataset=DATASET, classes=CLASSES, image_size=image_size, mask_size=mask_size,
        overwrite=overwrite, skip_bad_cases=skip_bad_cases, resize=resize,
    )
