"""The federated fingerprint: what each site tells the server so it can plan, and how the server merges it.

nnU-Net plans from a *dataset fingerprint*: per case its spacing and its shape after cropping to the non-zero
region, the foreground intensity statistics per channel, and the median share of the image the crop keeps
(``DatasetFingerprintExtractor``). Pooling the cases is what a federation must not do, so each site computes
**only summaries that merge exactly** (:func:`site_fingerprint`), and the server adds them up
(:func:`merge_fingerprints`) into the fingerprint nnU-Net would have computed on the pooled cases -- exactly for
the shapes and the crop share, which decide the plan; the intensity statistics come from every foreground pixel
instead of nnU-Net's random sample of them.

A site's fingerprint has exactly these fields (:data:`FIELDS`; anything else is refused by both the sending site
and the server, :func:`fingerprint_problems`):

``classes``           the class names of the task (the same at every site; part of the job's set-up anyway)
``num_cases``         how many 2D cases the site holds (train + validation, like nnU-Net's imagesTr)
``grey``              whether every image is grey (R = G = B): nnU-Net then plans one input channel
``cases_with_overlapping_classes``
                      how many cases have a pixel in two classes (any: the plan uses nnU-Net's regions)
``shapes``            ``[H, W, h, w, count]`` rows: how many cases have size H x W and a non-zero crop of h x w,
                      in sorted order, with no link to any case
``foreground_histograms``
                      per channel (R, G, B), 256 counts: how many foreground pixels (any class) have value
                      0..255 -- the intensity distribution of the foreground, pooled over all the site's cases

None of them holds a pixel position, a case or patient identifier, a file name, or anything per case: the shape
table and the histograms are counts over the whole site, in which no image can be reconstructed (a histogram
has no spatial arrangement; a crop size is two numbers). See docs/nnunet.md for the argument and its limits.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from typing import Mapping

import numpy as np

from fedfms.data.site_dataset import MAX_CLASSES
from fedfms.nnunet.config import FingerprintError
from fedfms.nnunet.plan import NATURAL_IMAGE_SPACING
from fedfms.nnunet.sitedata import NnUNetSiteData

FINGERPRINT_FORMAT = "fedfms-nnunet-fingerprint"
FINGERPRINT_VERSION = 1
FIELDS = ("format", "version", "classes", "num_cases", "grey", "cases_with_overlapping_classes", "shapes",
          "foreground_histograms")
CHANNELS = 3
LEVELS = 256
MAX_CASES = 10_000_000
PERCENTILES = (0.5, 50.0, 99.5)  # nnU-Net's


def site_fingerprint(data: NnUNetSiteData) -> dict:
    """The summary of one site's cases that leaves the site (module docstring). Crops with nnU-Net's own
    ``crop_to_nonzero``, foreground = pixels in any class inside the crop, as ``DatasetFingerprintExtractor``."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    shapes: Counter = Counter()
    hist = np.zeros((CHANNELS, LEVELS), dtype=np.int64)
    overlapping = 0
    for i, case in enumerate(data.cases):
        image = data.image(i, CHANNELS)  # (3, 1, H, W) float32 0..255, as nnU-Net's PNG reader
        seg = (case.packed > 0).astype(np.int16)[None, None]
        cropped, seg_cropped, _ = crop_to_nonzero(image, seg)
        shapes[(*image.shape[2:], *cropped.shape[2:])] += 1
        foreground = seg_cropped[0] > 0
        for c in range(CHANNELS):
            hist[c] += np.bincount(cropped[c][foreground].astype(np.int64), minlength=LEVELS)[:LEVELS]
        overlapping += int(((case.packed & (case.packed - 1)) != 0).any())
    fingerprint = {
        "format": FINGERPRINT_FORMAT,
        "version": FINGERPRINT_VERSION,
        "classes": list(data.classes),
        "num_cases": len(data),
        "grey": bool(data.grey),
        "cases_with_overlapping_classes": overlapping,
        "shapes": [[int(v) for v in key] + [int(n)] for key, n in sorted(shapes.items())],
        "foreground_histograms": hist.tolist(),
    }
    problems = fingerprint_problems(fingerprint)
    if problems:  # the site's own check before anything is sent
        raise FingerprintError(f"site {data.site}: its fingerprint is malformed: {'; '.join(problems)}")
    return fingerprint


def _count(v, upper=MAX_CASES) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= upper


def fingerprint_problems(fp) -> list[str]:
    """Why ``fp`` is not a valid site fingerprint (empty: valid). Never raises; any field outside
    :data:`FIELDS` is a problem, so a site can only ever send the agreed summary."""
    try:
        if not isinstance(fp, Mapping):
            return [f"fingerprint is a {type(fp).__name__}, expected an object"]
        extra, missing = sorted(set(fp) - set(FIELDS)), sorted(set(FIELDS) - set(fp))
        problems = []
        if extra:
            problems.append(f"field(s) {extra} are not part of the agreed fingerprint {list(FIELDS)}")
        if missing:
            problems.append(f"field(s) {missing} are missing")
        if problems:
            return problems
        if fp["format"] != FINGERPRINT_FORMAT or fp["version"] != FINGERPRINT_VERSION:
            problems.append(f"format {fp['format']!r} v{fp['version']!r}; expected {FINGERPRINT_FORMAT!r} v{FINGERPRINT_VERSION}")
        classes = fp["classes"]
        if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES or not all(isinstance(c, str) and c for c in classes):
            problems.append(f"classes is {classes!r}; expected 1 to {MAX_CLASSES} names")
        n = fp["num_cases"]
        if not _count(n) or n < 1:
            problems.append(f"num_cases is {n!r}; expected a positive integer up to {MAX_CASES}")
            n = None
        if not isinstance(fp["grey"], bool):
            problems.append(f"grey is {fp['grey']!r}; expected true or false")
        if not _count(fp["cases_with_overlapping_classes"], n if n is not None else MAX_CASES):
            problems.append(f"cases_with_overlapping_classes is {fp['cases_with_overlapping_classes']!r}; expected 0..num_cases")
        shapes = fp["shapes"]
        if not isinstance(shapes, list) or not shapes or not all(
                isinstance(r, list) and len(r) == 5 and all(_count(v, 1 << 20) for v in r)
                and 1 <= r[2] <= r[0] and 1 <= r[3] <= r[1] and r[4] >= 1 for r in shapes):
            problems.append("shapes must be [H, W, h, w, count] rows with 1 <= h <= H, 1 <= w <= W and count >= 1")
        elif n is not None and sum(r[4] for r in shapes) != n:
            problems.append(f"shapes count {sum(r[4] for r in shapes)} cases; num_cases is {n}")
        hist = fp["foreground_histograms"]
        if not isinstance(hist, list) or len(hist) != CHANNELS or not all(
                isinstance(h, list) and len(h) == LEVELS and all(_count(v, 1 << 62) for v in h) for h in hist):
            problems.append(f"foreground_histograms must be {CHANNELS} lists of {LEVELS} non-negative counts")
        return problems
    except Exception as exc:  # a check must never raise on malformed input
        return [f"fingerprint could not be checked ({type(exc).__name__}: {exc})"]


def _percentile(counts: np.ndarray, q: float) -> float:
    """``np.percentile`` (linear) of the values 0..255 repeated ``counts`` times, without expanding them."""
    total = int(counts.sum())
    position = q / 100.0 * (total - 1)
    lo, hi = math.floor(position), math.ceil(position)
    cum = np.cumsum(counts)
    v_lo = int(np.searchsorted(cum, lo, side="right"))
    v_hi = int(np.searchsorted(cum, hi, side="right"))
    return float(v_lo + (v_hi - v_lo) * (position - lo))


def intensity_properties(counts: np.ndarray) -> dict:
    """nnU-Net's ``foreground_intensity_properties_per_channel`` entry from a histogram of values 0..255."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    values = np.arange(LEVELS, dtype=np.float64)
    mean = float((values * counts).sum() / total)
    std = float(math.sqrt(((values - mean) ** 2 * counts).sum() / total))
    present = np.flatnonzero(counts)
    p_lo, median, p_hi = (_percentile(counts, q) for q in PERCENTILES)
    return {"mean": mean, "median": median, "std": std, "min": float(present[0]), "max": float(present[-1]),
            "percentile_99_5": p_hi, "percentile_00_5": p_lo}


def merge_fingerprints(fingerprints: Mapping[str, dict]) -> dict:
    """Site name -> fingerprint  =>  the federation's fingerprint: totals, and ``nnunet_fingerprint`` in
    nnU-Net's own layout (``spacings``, ``shapes_after_crop``, ``foreground_intensity_properties_per_channel``,
    ``median_relative_size_after_cropping``) as if the cases had been pooled. Per-site values are not kept."""
    if not fingerprints:
        raise FingerprintError("no site fingerprints to merge")
    for site, fp in fingerprints.items():
        problems = fingerprint_problems(fp)
        if problems:
            raise FingerprintError(f"site {site}: fingerprint refused: {'; '.join(problems)}")
    sites = sorted(fingerprints)
    classes = fingerprints[sites[0]]["classes"]
    for site in sites[1:]:
        if fingerprints[site]["classes"] != classes:
            raise FingerprintError(f"site {site} has classes {fingerprints[site]['classes']}, site {sites[0]} has "
                                   f"{classes}; the sites must share one task")
    grey = all(fingerprints[s]["grey"] for s in sites)
    channels = 1 if grey else CHANNELS
    hist = sum(np.asarray(fingerprints[s]["foreground_histograms"], dtype=np.int64) for s in sites)
    if hist[0].sum() == 0:
        raise FingerprintError(f"no site has a foreground pixel (sites {sites}); nothing to segment")
    rows = sorted(tuple(r) for s in sites for r in fingerprints[s]["shapes"])
    shapes_after_crop, relative = [], []
    for H, W, h, w, n in rows:
        shapes_after_crop += [[1, h, w]] * n
        relative += [h * w / (H * W)] * n
    num_cases = sum(fingerprints[s]["num_cases"] for s in sites)
    return {
        "num_sites": len(sites),
        "num_cases": num_cases,
        "classes": list(classes),
        "grey": grey,
        "overlapping_classes": any(fingerprints[s]["cases_with_overlapping_classes"] for s in sites),
        "nnunet_fingerprint": {
            "spacings": [list(NATURAL_IMAGE_SPACING)] * num_cases,
            "shapes_after_crop": shapes_after_crop,
            "foreground_intensity_properties_per_channel": {str(c): intensity_properties(hist[c]) for c in range(channels)},
            "median_relative_size_after_cropping": float(np.median(relative)),
        },
    }
