"""The offline demo federation: white matter on the MNI152 T1 template that ships inside nilearn.

No download, no user data. White matter is the brightest tissue of a clean T1, so on the template itself one
intensity threshold finds it (Dice ~0.84). Real scans are not clean: every scan here is the template seen by a
"scanner" with its own smooth multiplicative intensity inhomogeneity (a bias field, different in every scan and
strong enough that white matter on one side of a slice is darker than grey matter on the other), its own noise,
contrast curve (gamma) and head position (rotation, scale, shift), so no single threshold per site is right for
its scans. The four sites differ in scanner (how strong the inhomogeneity and noise are, the contrast curve) and
in size: ``site-3`` is scarce, with two scans (one to train on, one to validate), against six at the others;
``site-4``'s scanner inverts the tissue contrast (another sequence: white matter is the darkest tissue in the head,
not the brightest), the kind of site a single global model serves worst.

Each scan is a block of axial slices (every third slice, to keep the demo small) written as one NIfTI "case" in
the prostate layout, then prepared by the same NIfTI path as real volumes (percentile window, depth slicing,
resizing). Everything is seeded: the same call writes the same files.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedfms.data.preparers import common, layout, prostate
from fedfms.errors import DataError

DATASET = "mni-demo"
SITES = ("site-1", "site-2", "site-3", "site-4")
TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
WHITE_MATTER = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
MIN_WM_VOXELS = 2000  # axial slices with this much white matter (1 mm voxels): above the cerebellum's fringe
RAW_VERSION = 3  # bump when the raw volumes change: an older raw folder is built again


@dataclass(frozen=True)
class Scanner:
    """How one site's scanner sees the template."""

    scans: int  # cases (patients) at the site
    slices: int  # axial slices per scan (every third slice of the template)
    bias: float  # std of the log bias field inside the head: 0.3 -> about +-35 % from one side to the other
    noise: float  # Rician noise, as a share of the brightest tissue
    gamma: float  # contrast curve on the [0, 1] image
    description: str
    invert: bool = False  # tissue contrast reversed inside the head (white matter darkest), background still dark


SCANNERS = {
    "site-1": Scanner(scans=6, slices=8, bias=0.25, noise=0.02, gamma=0.8, description="6 scans, moderate inhomogeneity"),
    "site-2": Scanner(scans=6, slices=8, bias=0.35, noise=0.03, gamma=1.2, description="6 scans, strong inhomogeneity, harder contrast"),
    "site-3": Scanner(scans=2, slices=6, bias=0.35, noise=0.04, gamma=1.0,
                      description="scarce: 2 scans (1 to train, 1 to validate), strong inhomogeneity, noisy"),
    "site-4": Scanner(scans=6, slices=8, bias=0.25, noise=0.03, gamma=1.0, invert=True,
                      description="6 scans, inverted contrast (another sequence: white matter darkest), moderate inhomogeneity"),
}
SLICE_STRIDE = 3
FOV = 160  # mm (voxels) of the square in-plane field of view


def nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn is not installed; expected the package that ships the MNI152 template (pip install nilearn)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    for name in (TEMPLATE, WHITE_MATTER):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: missing from the installed nilearn; expected the MNI152 2009a template files")
    return folder


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float, head: np.ndarray) -> np.ndarray:
    """A smooth multiplicative field over a scan: exp(strength * f), f a random linear ramp plus a broad bump,
    scaled to unit std inside the head."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    zz = np.meshgrid(*axes, indexing="ij")
    direction = rng.normal(size=3)
    direction[2] *= 0.3  # mostly in-plane, as a receive coil's sensitivity
    direction /= np.linalg.norm(direction)
    ramp = sum(d * a for d, a in zip(direction, zz))
    centre = rng.uniform(-0.6, 0.6, size=3)
    width = rng.uniform(0.5, 0.9)
    bump = np.exp(-sum((a - c) ** 2 for a, c in zip(zz, centre)) / (2 * width**2))
    f = ramp + rng.uniform(-1.5, 1.5) * bump
    inside = f[head] if head.any() else f.ravel()
    f = (f - inside.mean()) / (inside.std() + 1e-6)
    return np.exp(strength * f).astype(np.float32)


def _pose(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same random in-plane rotation, scale and shift for every slice of a scan (a head placed differently)."""
    from scipy import ndimage

    angle = np.deg2rad(rng.uniform(-12, 12))
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-8, 8, size=2)
    c, s = np.cos(angle), np.sin(angle)
    matrix = np.array([[c, -s], [s, c]]) / scale
    centre = (np.array(image.shape[:2]) - 1) / 2
    offset = centre - matrix @ (centre + shift)
    out_image = np.stack([ndimage.affine_transform(image[:, :, k], matrix, offset, order=1) for k in range(image.shape[2])], -1)
    out_labels = np.stack([ndimage.affine_transform(labels[:, :, k], matrix, offset, order=1) for k in range(labels.shape[2])], -1)
    return out_image, out_labels


def _scan(rng: np.random.Generator, scanner: Scanner, t1: np.ndarray, wm: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One scan: the template's slices ``block`` placed, seen through ``scanner``; image on an MRI-like scale and
    the white-matter mask (uint8)."""
    image, wm_prob = _pose(rng, t1[:, :, block], wm[:, :, block])
    head = image > 0.05
    x = np.clip(image, 0, 1) ** scanner.gamma
    if scanner.invert:
        x = np.where(head, np.clip(1.0 - x, 0.0, None) + 0.1, 0.0).astype(np.float32)
    x = x * _bias_field(rng, x.shape, scanner.bias, head)
    sigma = scanner.noise
    x = np.sqrt((x + rng.normal(0, sigma, x.shape)) ** 2 + rng.normal(0, sigma, x.shape) ** 2)  # Rician
    return (x * 1000.0).astype(np.float32), (wm_prob > 0.5).astype(np.uint8)


def _settings() -> dict:
    return {"raw_version": RAW_VERSION, "slice_stride": SLICE_STRIDE, "fov": FOV,
            "scanners": {site: asdict(s) for site, s in SCANNERS.items()}}


def build_raw(raw: Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``raw/<site>/CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz`` for the four demo sites (a raw folder
    written by another version of this function is written again)."""
    import nibabel as nib

    raw = Path(raw)
    done = raw / ".complete"
    wanted = json.dumps({"seed": seed, **_settings()}, sort_keys=True)
    if done.is_file() and not overwrite and done.read_text().strip() == wanted:
        return raw
    folder = nilearn_data_dir()
    t1_img = nib.load(str(folder / TEMPLATE))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    t1 = t1 / np.percentile(t1[t1 > 0], 99.5)
    # a square field of view around the brain's centre: 1 mm voxels in both directions, and the brain fills it
    cy, cx = (int(round(c)) for c in np.argwhere(t1.max(axis=2) > 0.05).mean(axis=0))
    h = FOV // 2
    crop = (slice(max(cy - h, 0), max(cy - h, 0) + FOV), slice(max(cx - h, 0), max(cx - h, 0) + FOV))
    affine = t1_img.affine.copy()
    affine[:3, 3] += affine[:3, :2] @ np.array([crop[0].start, crop[1].start])
    t1 = np.ascontiguousarray(t1[crop])
    wm = np.ascontiguousarray(np.asarray(nib.load(str(folder / WHITE_MATTER)).dataobj, dtype=np.float32)[crop]) / 255.0
    slices = np.array([z for z in range(t1.shape[2]) if (wm[:, :, z] > 0.5).sum() >= MIN_WM_VOXELS])  # z 36-139
    done.unlink(missing_ok=True)
    for s, site in enumerate(SITES):
        scanner = SCANNERS[site]
        span = scanner.slices * SLICE_STRIDE
        rng = np.random.default_rng([seed, s])
        site_dir = raw / site
        site_dir.mkdir(parents=True, exist_ok=True)
        for old in site_dir.glob("Case*.nii.gz"):
            old.unlink()
        # scans spread evenly over the brain's height (neither end), each shifted by a few slices at random
        starts = np.linspace(slices[0], slices[-1] - span, scanner.scans + 2)[1:-1] + rng.uniform(-4, 4, scanner.scans)
        for c, start in enumerate(np.clip(starts.round().astype(int), slices[0], slices[-1] - span)):
            block = np.arange(start, start + span, SLICE_STRIDE)
            image, seg = _scan(rng, scanner, t1, wm, block)
            nib.save(nib.Nifti1Image(image, affine), str(site_dir / f"Case{c:02d}.nii.gz"))
            nib.save(nib.Nifti1Image(seg, affine), str(site_dir / f"Case{c:02d}_segmentation.nii.gz"))
    done.write_text(wanted + "\n")
    return raw


def to_white_matter(seg: np.ndarray, seg_path: Path) -> np.ndarray:
    common.check_labels(seg, (0, 1), seg_path, "0 background, 1 white matter")
    return seg > 0


def prepare_demo(raw: Path, out: Path, *, image_size: int = 128, mask_size: int = 32, overwrite: bool = False,
                 sites=None) -> list[Path]:
    """Build the raw demo volumes in ``raw`` if needed, then prepare each site through the NIfTI path of real data."""
    build_raw(raw)
    settings = {"low_pct": 1.0, "high_pct": 99.0, **_settings()}
    # every slice of a demo scan holds white matter: all of them are kept
    recipe = layout.VolumeRecipe(("white_matter",), to_white_matter, low_pct=1.0, high_pct=99.0)
    return common.write_sites(
        ((prostate.find_cases(site, Path(raw) / site, recipe), {**settings, "scanner": asdict(SCANNERS[site])})
         for site in common.select_sites(sites, list(SITES), DATASET)),
        out=Path(out), dataset=DATASET, classes=["white_matter"], image_size=image_size, mask_size=mask_size,
        overwrite=overwrite, skip_bad_cases=False,
    )
