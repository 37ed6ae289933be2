"""A learnable synthetic site (bright discs on textured noise) for tests and benchmarks.

Written through :class:`SiteWriter`, so it exercises the same format and reader as real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfms.data.site_dataset import SiteWriter


def make_disc_site(
    out_dir: str | Path,
    site: str = "synthetic",
    num_volumes: int = 4,
    slices_per_volume: int = 6,
    size: int = 64,
    image_size: int = 128,
    mask_size: int = 32,
    brightness: float = 0.35,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Each slice: noise background, one disc brighter by ``brightness``; the mask is the disc.
    ``brightness`` varies the contrast between sites (a simple non-IID shift)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    settings = {"generator": "discs", "size": size, "brightness": brightness, "seed": seed}
    with SiteWriter(out_dir, site, "synthetic", ["disc"], image_size, mask_size, settings, overwrite) as writer:
        for v in range(num_volumes):
            for s in range(slices_per_volume):
                cy, cx = rng.uniform(0.25, 0.75, size=2) * size
                r = rng.uniform(0.12, 0.25) * size
                disc = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
                image = rng.uniform(0.1, 0.5, size=(size, size)) + brightness * disc
                writer.add(np.clip(image, 0, 1).astype(np.float32), disc.astype(np.uint8), f"{site}_case{v}", s)
    return Path(out_dir)
