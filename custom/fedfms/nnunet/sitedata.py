"""A site's prepared folder as nnU-Net cases, converted on the fly inside the site's own process.

Every 2D sample of a site folder (``fedfms.data.site_dataset``) becomes one nnU-Net case at the **mask
resolution** (where every model of this project is scored): the image is shrunk to the mask size with the same
resize the other models use, its padding (a sample whose aspect ratio was kept) cropped off, and stored as uint8
(0..255, the values nnU-Net's PNG reader would read); the mask stays bit-packed (bit k = class k). Nothing is
written anywhere: the cases live in this process's memory, and nnU-Net's own preprocessing (crop to the non-zero
region, normalisation, foreground locations) runs per case when the training loop or the evaluation asks for it
(:meth:`NnUNetSiteData.nnunet_case`).

Splits are the project's: each site by patient with ``val_fraction``/``split_seed`` (``patient_split``), so the
nnU-Net baseline trains and validates on exactly the samples the other methods do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedfms.data.site_dataset import SiteDataset, patient_split, read_manifest
from fedfms.errors import DataError
from fedfms.nnunet.config import PlanError
from fedfms.nnunet.plan import NATURAL_IMAGE_SPACING


@dataclass
class Case:
    id: str
    volume: str
    image: np.ndarray  # (3, H, W) uint8, or (1, H, W) when the site is grey
    packed: np.ndarray  # (H, W) uint8, bit k set <=> the pixel is in class k


class NnUNetSiteData:
    """One site (or several pooled, for the centralised baseline) as nnU-Net cases. ``splits``: ``train``,
    ``val`` and ``all`` -> case indices."""

    def __init__(self, site_dir: str | os.PathLike | Sequence[str | os.PathLike], val_fraction: float = 0.1,
                 split_seed: int = 0):
        dirs = [site_dir] if isinstance(site_dir, (str, os.PathLike)) else list(site_dir)
        if not dirs:
            raise DataError("no site folder given")
        self.cases: list[Case] = []
        self.splits: dict[str, list[int]] = {"train": [], "val": [], "all": []}
        self.classes: list[str] | None = None
        names = []
        for d in dirs:
            m = read_manifest(d)
            ds = SiteDataset(d, image_size=m.mask_size, mask_size=m.mask_size)  # the mask resolution
            if self.classes is None:
                self.classes = list(m.classes)
            elif m.classes != self.classes:
                raise DataError(f"{d}: classes {m.classes} differ from {self.classes}; cannot pool")
            names.append(m.site)
            train_idx, val_idx = patient_split(ds.volumes, val_fraction, split_seed)
            offset = len(self.cases)
            for i in range(len(ds)):
                item = ds[i]
                # a sample padded to the square (aspect ratio kept) becomes a case of its content only
                rows, cols = item["valid"][0].any(dim=1).sum().item(), item["valid"][0].any(dim=0).sum().item()
                image = np.clip(np.round(item["image"].numpy() * 255.0), 0, 255).astype(np.uint8)[:, :rows, :cols]
                bits = item["mask"].numpy()[:, :rows, :cols] > 0.5
                packed = np.zeros(bits.shape[1:], dtype=np.uint8)
                for k in range(bits.shape[0]):
                    packed |= bits[k].astype(np.uint8) << k
                self.cases.append(Case(item["id"], item["volume"], image, packed))
            self.splits["train"] += [offset + i for i in train_idx]
            self.splits["val"] += [offset + i for i in val_idx]
            self.splits["all"] += list(range(offset, len(self.cases)))
        self.site = "+".join(names)
        # a grey site (every image has R == G == B, e.g. MRI slices copied to three channels) keeps one channel
        self.grey = all((c.image[0] == c.image[1]).all() and (c.image[0] == c.image[2]).all() for c in self.cases)
        if self.grey:
            for c in self.cases:
                c.image = np.ascontiguousarray(c.image[:1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.cases)

    # ------------------------------------------------------------------ nnU-Net arrays
    def image(self, index: int, channels: int) -> np.ndarray:
        """(channels, 1, H, W) float32 in 0..255: what nnU-Net's ``NaturalImage2DIO`` reads from a PNG."""
        img = self.cases[index].image
        if channels == 3 and img.shape[0] == 1:
            img = np.repeat(img, 3, axis=0)
        elif channels == 1 and img.shape[0] == 3:
            if not ((img[0] == img[1]).all() and (img[0] == img[2]).all()):
                raise PlanError(f"site {self.site}: the plan is for grey images (one channel) but case "
                                f"{self.cases[index].id!r} has colour; plan with this site taking part")
            img = img[:1]
        return img.astype(np.float32)[:, None]

    def label_map(self, index: int, label_mode: str) -> np.ndarray:
        """(1, 1, H, W) nnU-Net label map: softmax: class k -> k + 1; regions: the bit-packed class set."""
        packed = self.cases[index].packed
        if label_mode == "regions":
            seg = packed.astype(np.int16)
        else:
            several = (packed & (packed - 1)) != 0  # more than one bit set
            if several.any():
                raise PlanError(f"site {self.site}: case {self.cases[index].id!r} has pixels in several classes, but the "
                                "plan trains exclusive classes (softmax); plan with this site taking part")
            seg = np.zeros(packed.shape, dtype=np.int16)
            for k in range(self.num_classes):
                seg[(packed >> k) & 1 == 1] = k + 1
        return seg[None, None]

    def targets(self, index: int) -> np.ndarray:
        """(C, H, W) float32 {0, 1}: the per-class masks every model here is scored against."""
        packed = self.cases[index].packed
        return np.stack([((packed >> k) & 1).astype(np.float32) for k in range(self.num_classes)])

    def nnunet_case(self, index: int, plan: dict, managers, with_seg: bool = True):
        """nnU-Net's ``DefaultPreprocessor.run_case_npy`` on one case: crop to the non-zero region, normalise
        (the plan's scheme), resample to the plan's spacing (nothing to do at 1 x 1), and the foreground
        locations for oversampling. Returns (data (c, 1, h, w), seg (1, 1, h, w) or None, properties)."""
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

        pm, cm, _ = managers
        data = self.image(index, plan["num_input_channels"])
        seg = self.label_map(index, plan["label_mode"]) if with_seg else None
        properties = {"spacing": list(NATURAL_IMAGE_SPACING)}
        data, seg, properties = DefaultPreprocessor(verbose=False).run_case_npy(data, seg, properties, pm, cm,
                                                                                plan["dataset_json"])
        return data, (seg if with_seg else None), properties
