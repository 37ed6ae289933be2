"""The offline demo federation: white matter on the MNI152 T1 template that ships inside nilearn.

No download, no user data. Axial slices with white matter are dealt to three sites by ``z mod 3``; each site
gets its own scanner-like intensity change (gamma 0.7 / smooth bias field / gamma 1.4 + noise), so the sites
are not identically distributed. Each site's slices are cut into a few contiguous blocks written as separate
NIfTI "cases" in the prostate layout, then prepared by the prostate preparer's own NIfTI path (percentile
window, depth slicing, resizing), exactly as real volumes are.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import numpy as np

from fedfms.data.preparers import common, prostate
from fedfms.errors import DataError

DATASET = "mni-demo"
SITES = ("site-1", "site-2", "site-3")
TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
WHITE_MATTER = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
MIN_WM_VOXELS = 100


def nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn is not installed; expected the package that ships the MNI152 template (pip install nilearn)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    for name in (TEMPLATE, WHITE_MATTER):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: missing from the installed nilearn; expected the MNI152 2009a template files")
    return folder


def _site_intensity(site_index: int, t1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scanner-like differences between sites, on a [0, 1] image; returned on an MRI-like scale."""
    x = np.clip(t1 / np.percentile(t1, 99.5), 0, 1)
    if site_index == 0:
        x = x**0.7
    elif site_index == 1:
        h, w = x.shape
        yy, xx = np.mgrid[:h, :w]
        field = 1.0 + 0.45 * np.sin(np.pi * yy / h) * np.cos(0.5 * np.pi * xx / w) - 0.25 * (xx / w)
        x = x * field
    else:
        x = x**1.4 + rng.normal(0.0, 0.04, size=x.shape)
    return (np.clip(x, 0, None) * 1000.0).astype(np.float32)


def build_raw(raw: Path, cases_per_site: int = 4, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``raw/<site>/CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz`` for the three demo sites."""
    import nibabel as nib

    raw = Path(raw)
    done = raw / ".complete"
    if done.is_file() and not overwrite:
        return raw
    folder = nilearn_data_dir()
    t1_img = nib.load(str(folder / TEMPLATE))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(str(folder / WHITE_MATTER)).dataobj, dtype=np.float32) / 255.0 > 0.5
    slices = [z for z in range(t1.shape[2]) if wm[:, :, z].sum() >= MIN_WM_VOXELS]
    rng = np.random.default_rng(seed)
    for s, site in enumerate(SITES):
        own = [z for z in slices if z % len(SITES) == s]
        site_dir = raw / site
        site_dir.mkdir(parents=True, exist_ok=True)
        for c, block in enumerate(np.array_split(np.array(own), cases_per_site)):
            image = np.stack([_site_intensity(s, t1[:, :, z], rng) for z in block], axis=-1)
            seg = wm[:, :, block].astype(np.uint8)
            nib.save(nib.Nifti1Image(image, t1_img.affine), str(site_dir / f"Case{c:02d}.nii.gz"))
            nib.save(nib.Nifti1Image(seg, t1_img.affine), str(site_dir / f"Case{c:02d}_segmentation.nii.gz"))
    done.write_text("complete\n")
    return raw


def prepare_demo(raw: Path, out: Path, *, image_size: int = 128, mask_size: int = 32, overwrite: bool = False,
                 sites=None) -> list[Path]:
    """Build the raw demo volumes in ``raw`` if needed, then prepare each site through the prostate NIfTI path."""
    build_raw(raw, overwrite=overwrite)
    settings = {"low_pct": 1.0, "high_pct": 99.0, "empty_keep": None, "two_and_half_d": False}
    load = partial(prostate._load_case, **settings)
    return common.write_sites(
        ((prostate.find_cases(site, Path(raw) / site, load), settings)
         for site in common.select_sites(sites, list(SITES), DATASET)),
        out=Path(out), dataset=DATASET, classes=["white_matter"], image_size=image_size, mask_size=mask_size,
        overwrite=overwrite, skip_bad_cases=False,
    )
