"""Synthetic sites for the nnU-Net tests, written through the project's SiteWriter (the real site format).

``make_bordered_site``: grey slices whose anatomy (noise) fills a random rectangle of a black frame, a disc
inside; the rectangles vary in size, so nnU-Net's crop to the non-zero region, its median crop share and its
``use_mask_for_norm`` decision all have something to do. ``make_two_class_site``: RGB, a disc with a cup
inside it (overlapping classes, as fundus), for nnU-Net's region-based planning."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfms.data.site_dataset import SiteWriter


def make_bordered_site(out_dir, site="bordered", num_volumes=3, slices_per_volume=4, size=48, mask_size=48,
                       fill=(0.35, 0.9), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with SiteWriter(out_dir, site, "synthetic", ["disc"], size, mask_size, {"generator": "bordered"}) as writer:
        for v in range(num_volumes):
            for s in range(slices_per_volume):
                h, w = (rng.uniform(*fill, size=2) * size).astype(int)
                y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
                image = np.zeros((size, size), np.float32)
                image[y0:y0 + h, x0:x0 + w] = rng.uniform(0.1, 0.5, size=(h, w))
                cy, cx, r = y0 + h / 2, x0 + w / 2, min(h, w) / 4
                disc = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
                image[disc] += 0.4
                writer.add(np.clip(image, 0, 1), disc.astype(np.uint8), f"{site}_case{v}", s)
    return Path(out_dir)


def make_two_class_site(out_dir, site="fundus", num_volumes=3, slices_per_volume=3, size=32, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with SiteWriter(out_dir, site, "synthetic", ["disc", "cup"], size, size, {"generator": "disc+cup"}) as writer:
        for v in range(num_volumes):
            for s in range(slices_per_volume):
                cy, cx = rng.uniform(0.35, 0.65, size=2) * size
                r = rng.uniform(0.18, 0.28) * size
                d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                disc, cup = d2 <= r * r, d2 <= (r / 2) ** 2
                image = rng.uniform(0.1, 0.4, size=(size, size, 3)).astype(np.float32)
                image[disc] += (0.3, 0.2, 0.1)
                image[cup] += (0.2, 0.3, 0.3)
                writer.add(np.clip(image, 0, 1), np.stack([disc, cup]).astype(np.uint8), f"{site}_case{v}", s)
    return Path(out_dir)
