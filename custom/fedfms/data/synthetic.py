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


def disc_tile(rng: np.random.Generator, height: int, width: int, brightness: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """One 8-bit grey tile (noise in [0.1, 0.5], a disc brighter by ``brightness``) and its disc mask (bool). The
    disc is round in pixels whatever the tile's shape, so a stretched tile shows it as an ellipse."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    r = rng.uniform(0.18, 0.26) * min(height, width)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = np.clip(rng.uniform(0.1, 0.5, (height, width)) + brightness * disc, 0, 1)
    return (image * 255).astype(np.uint8), disc


def make_raw_tile_sites(raw: str | Path, sites: int = 4, tiles: int = 8, size: int = 128,
                        odd: tuple[int, int] | None = (96, 128), seed: int = 0) -> Path:
    """A hospital's own 2D data as ``fedfms prepare images`` reads it, generated: ``raw/site<k>/images/tile<j>.png``
    (8-bit grey) and ``raw/site<k>/masks/tile<j>.png`` (0/255). Every tile is ``size`` square except the first tile
    of site1, which is ``odd`` (height, width). Not microscopy: bright discs on noise, learnable in seconds."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    raw = Path(raw)
    for s in range(1, sites + 1):
        for folder in ("images", "masks"):
            (raw / f"site{s}" / folder).mkdir(parents=True, exist_ok=True)
        for j in range(tiles):
            h, w = odd if (odd and s == 1 and j == 0) else (size, size)
            image, disc = disc_tile(rng, h, w, brightness=0.3 + 0.03 * s)
            Image.fromarray(image).save(raw / f"site{s}" / "images" / f"tile{j}.png")
            Image.fromarray((disc * 255).astype(np.uint8)).save(raw / f"site{s}" / "masks" / f"tile{j}.png")
    return raw
