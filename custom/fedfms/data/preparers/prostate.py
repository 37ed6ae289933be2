"""Multi-site prostate T2 MRI (the six-site collection used by MS-Net/SAML, HarmoFL, FedFMS).

Raw layout (docs/datasets.md)::

    RAW/<SITE>/Case00.nii.gz
    RAW/<SITE>/Case00_segmentation.nii.gz     (or Case00_Segmentation.nii.gz; .nii also accepted)

Sites BIDMC, HK, I2CVB, ISBI, ISBI1.5, UCL. The SAML release names some folders by institution
(RUNMC = ISBI, BMC = ISBI1.5, HCRUDB = I2CVB); those names are accepted too. A layout over the general volume
importer (:mod:`fedfms.data.preparers.layout`, ``fedfms prepare volumes``): its own file names, labels 1 and 2 as
one class.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedfms.data import volumes as vol
from fedfms.data.geometry import PAD, check_resize
from fedfms.data.preparers import common, layout, presets
from fedfms.errors import DataError

DATASET = "prostate"
CLASSES = ["prostate"]
SITES = {
    "BIDMC": ("BIDMC",),
    "HK": ("HK",),
    "I2CVB": ("I2CVB", "HCRUDB"),
    "ISBI": ("ISBI", "RUNMC"),
    "ISBI1.5": ("ISBI1.5", "ISBI_1.5", "ISBI-1.5", "BMC"),
    "UCL": ("UCL",),
}
# The ISBI sites delineate two zones (1 = central gland, 2 = peripheral zone); both are prostate.
ALLOWED_LABELS = (0, 1, 2)
_SEG = re.compile(r"(.+)_segmentation", re.IGNORECASE)


def find_cases(site: str, site_dir: Path, recipe: layout.VolumeRecipe) -> common.SiteSource:
    """``CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz`` pairs in the site folder itself."""
    images: dict[str, Path] = {}
    segs: dict[str, Path] = {}
    problems: list[common.Problem] = []
    for p in sorted(site_dir.iterdir()):
        stem = vol.nifti_stem(p)
        if not p.is_file() or not common.visible(p) or stem is None:
            continue
        m = _SEG.fullmatch(stem)
        table, key = (segs, m.group(1)) if m else (images, stem)
        if key in table:
            raise DataError(f"{site_dir}: {table[key].name} and {p.name} are the same case; expected one file per case")
        table[key] = p
    cases = []
    for key, image in images.items():
        if key not in segs:
            problems.append(common.Problem(image, f"no segmentation; expected {key}_segmentation.nii.gz next to it"))
            continue
        # Every site numbers its cases from Case00, so the site is part of the volume id: pooled
        # (centralised) training must not treat BIDMC/Case00 and HK/Case00 as one patient.
        cases.append(layout.volume_case(key, image, (segs[key],), f"{site}_{key}", recipe))
    for key in sorted(set(segs) - set(images)):
        problems.append(common.Problem(segs[key], f"segmentation without image; expected {key}.nii.gz next to it"))
    return common.SiteSource(site, site_dir, cases, problems)


def to_prostate(seg: np.ndarray, seg_path: Path) -> np.ndarray:
    common.check_labels(seg, ALLOWED_LABELS, seg_path, "0 background, 1 and 2 prostate (zones)")
    return seg > 0


def prepare_prostate(
    raw: Path,
    out: Path,
    *,
    image_size: int = 1024,
    mask_size: int = 256,
    overwrite: bool = False,
    sites=None,
    low_pct: float = 1.0,
    high_pct: float = 99.0,
    empty_slices_keep="all",
    two_and_half_d: bool = False,
    skip_end_slices: bool = False,
    skip_bad_cases: bool = False,
    mask_resize: str = common.DEFAULT_MASK_RESIZE,
    preset: str = presets.PROJECT,
    resize: str = PAD,
) -> list[Path]:
    """Prepare the prostate sites; returns ``out/<site>`` for each. Every depth slice is kept by default
    (``empty_slices_keep='all'``), as in the paper. ``mask_resize``: the masks' nearest-neighbour rule
    (``"nearest-exact"``, or ``"nearest"`` = OpenCV's INTER_NEAREST). ``preset='reference'`` requires the paper
    code's values (:mod:`fedfms.data.preparers.presets`: window from the volume's minimum to its 99th percentile,
    INTER_NEAREST masks)."""
    raw, out = Path(raw), Path(out)
    vol.check_percentiles(low_pct, high_pct)
    empty_keep = vol.parse_empty_keep(empty_slices_keep)
    settings = {
        "preset": presets.check_name(preset),
        "low_pct": float(low_pct),
        "high_pct": float(high_pct),
        "empty_slices_keep": "all" if empty_keep is None else empty_keep,
        "two_and_half_d": bool(two_and_half_d),
        "skip_end_slices": bool(skip_end_slices),
        "mask_resize": common.check_mask_resize(mask_resize),
        "label_map": "seg in {1,2} -> prostate",
    }
    presets.check(DATASET, preset, {**settings, "resize": check_resize(resize)})
    chosen = common.select_sites(sites, list(SITES), DATASET)
    # Resolve every folder before writing anything, so a layout mistake fails fast.
    site_dirs = {s: common.find_site_dir(raw, s, SITES[s], DATASET) for s in chosen}
    recipe = layout.VolumeRecipe(tuple(CLASSES), to_prostate, low_pct=float(low_pct), high_pct=float(high_pct),
                                 empty_keep=empty_keep, two_and_half_d=bool(two_and_half_d), skip_end_slices=bool(skip_end_slices))
    return common.write_sites(
        ((find_cases(site, site_dirs[site], recipe), settings) for site in chosen),
        out=out, dataset=DATASET, classes=CLASSES, image_size=image_size, mask_size=mask_size,
        overwrite=overwrite, skip_bad_cases=skip_bad_cases, resize=resize,
    )
