"""Preparation presets: this project's defaults, or the paper code's preprocessing, behind one switch.

``fedfms prepare DATASET --preset reference`` prepares a dataset the way the authors' code (LIU-YUXI/FedFMS,
``preprocess_*.py`` and the client lists of ``train_fed_sam.py``) did where it departs from this project;
``--preset project`` (the default) keeps this project's choices. Every value a preset sets is also an ordinary
option of its preparer, so any mix can be had without a preset; the preset only bundles them and is recorded in
the manifest (``settings.preset``), so a site prepared under one preset is never taken as prepared under the
other (a re-run with the other preset refuses without ``--overwrite``).

* ``project``: the preparers' defaults; options change them as usual.
* ``reference``: the values below, all at once. An option given with another value is refused (one switch must
  not be silently half-undone); options a preset does not set (sites, sizes, ``--clients``, ``--mask-coding``,
  ``--skip-bad-cases``, ...) combine freely.

What ``reference`` sets, per dataset (values in the form the manifest records them):

========  ====================  ========================  ======================================================
dataset   option                project (default)         reference (the paper code)
========  ====================  ========================  ======================================================
prostate  low_pct / high_pct    1 / 99                    0 (the volume's minimum) / 99
          empty_slices_keep     all                       all
          two_and_half_d        false                     false
          skip_end_slices       false                     false
fets      target_labels         [4] enhancing tumour      [1, 4] necrosis + enhancing tumour (tumour core)
          low_pct / high_pct    1 / 99                    0 / 99
          two_and_half_d        false                     true (slices k-1, k, k+1)
          empty_slices_keep     all                       every:5 (an empty slice is kept when k % 5 == 0)
          skip_end_slices       false                     true (first and last slice never kept)
fundus    disc_includes_cup     true (whole disc)         false (disc channel = rim, disc minus cup)
nuclei    pannuke_folds         all                       Adrenal_gland, Esophagus: fold 2; Bile-duct, Uterus: fold 3
          monuseg_subset        all                       train (the 14 MoNuSeg 2018 test images left out)
all four  mask_resize           nearest-exact             nearest (OpenCV's INTER_NEAREST: output pixel i of n
                                (floor((i+0.5)*m/n))      takes source pixel floor(i * m / n), m the source side)
all four  resize                pad (aspect ratio kept)   stretch (both sides to the square, as cv2.resize)
========  ====================  ========================  ======================================================

Images are resized bilinearly under both presets (the paper code uses OpenCV's INTER_LINEAR, not a nearest rule).

The evidence for each value (file and line of the authors' code) is in docs/datasets.md, "Presets".
"""

from __future__ import annotations

import copy
import json

from fedfms.errors import ConfigError

PROJECT = "project"
REFERENCE = "reference"
PRESETS = (PROJECT, REFERENCE)

# The PanNuke fold each tissue came from in the paper code (its client folders PanNuke2Adrenal_gland,
# PanNuke2Esophagus, PanNuke3Bile-duct, PanNuke3Uterus).
REFERENCE_PANNUKE_FOLDS = {"Adrenal_gland": [2], "Esophagus": [2], "Bile-duct": [3], "Uterus": [3]}

# The paper code resizes every dataset's labels with OpenCV's INTER_NEAREST, which is torch's "nearest".
_MASK_RESIZE = ("nearest", "the paper code resizes masks with OpenCV's INTER_NEAREST, torch's 'nearest'")

# dataset -> option -> (value, why): what --preset reference sets, in the canonical form the preparers record
STRETCH_WHY = "the paper code resized every image to a 1024 x 1024 square without keeping its aspect ratio (cv2.resize)"

REFERENCE_VALUES: dict[str, dict[str, tuple[object, str]]] = {
    "prostate": {
        "low_pct": (0.0, "the paper code's window starts at the volume's minimum"),
        "high_pct": (99.0, "the paper code's window ends at the 99th percentile"),
        "empty_slices_keep": ("all", "the paper code keeps every prostate slice"),
        "two_and_half_d": (False, "the paper code feeds prostate slices in 2D"),
        "skip_end_slices": (False, "the paper code keeps the first and last prostate slice"),
        "mask_resize": _MASK_RESIZE,
        "resize": ("stretch", STRETCH_WHY),
    },
    "fets": {
        "target_labels": ([1, 4], "the paper code's FeTS target is labels 1 and 4"),
        "low_pct": (0.0, "the paper code's window starts at the volume's minimum"),
        "high_pct": (99.0, "the paper code's window ends at the 99th percentile"),
        "two_and_half_d": (True, "the paper code feeds FeTS slices k-1, k, k+1 as RGB"),
        "empty_slices_keep": ("every:5", "the paper code keeps a FeTS slice without target only when its index is a multiple of 5"),
        "skip_end_slices": (True, "the paper code never keeps the first or last FeTS slice"),
        "mask_resize": _MASK_RESIZE,
        "resize": ("stretch", STRETCH_WHY),
    },
    "fundus": {
        "disc_includes_cup": (False, "the paper code's optic-disc class is the rim (disc minus cup)"),
        "mask_resize": _MASK_RESIZE,
        "resize": ("stretch", STRETCH_WHY),
    },
    "nuclei": {
        "pannuke_folds": (REFERENCE_PANNUKE_FOLDS, "the paper code took Adrenal_gland and Esophagus from PanNuke fold 2, "
                                                   "Bile-duct and Uterus from fold 3"),
        "monuseg_subset": ("train", "the paper code used the MoNuSeg 2018 training set only"),
        "mask_resize": _MASK_RESIZE,
        "resize": ("stretch", STRETCH_WHY),
    },
}


def check_name(preset) -> str:
    if preset not in PRESETS:
        raise ConfigError(f"preset is {preset!r}; expected one of {', '.join(PRESETS)}")
    return preset


def preset_options(dataset: str, preset: str) -> dict[str, object]:
    """The preparer options ``preset`` sets for ``dataset`` (none for ``project``: its values are the defaults)."""
    check_name(preset)
    if preset == PROJECT:
        return {}
    return {name: copy.deepcopy(value) for name, (value, _) in REFERENCE_VALUES.get(dataset, {}).items()}


def fill(dataset: str, preset: str | None, options: dict) -> dict:
    """``options`` with the values of ``preset`` added where the caller gave none (the caller's own values stay,
    and :func:`check` refuses the ones that contradict the preset)."""
    if preset is None:
        return dict(options)
    out = dict(options)
    for name, value in preset_options(dataset, preset).items():
        if out.get(name) is None:
            out[name] = value
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return ",".join(f"{k}={'+'.join(str(f) for f in v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def check(dataset: str, preset: str, effective: dict) -> None:
    """Refuse a run whose options contradict ``preset``. ``effective``: the preparer's option values in canonical
    form (as it records them). Only ``reference`` pins values; ``project`` is the defaults, which options change."""
    check_name(preset)
    if preset == PROJECT:
        return
    for name, (value, why) in REFERENCE_VALUES.get(dataset, {}).items():
        got = effective.get(name)
        if json.loads(json.dumps(got)) != json.loads(json.dumps(value)):
            raise ConfigError(
                f"{_flag(name)} is {_show(got)}, but --preset {preset} sets it to {_show(value)} ({why}); "
                f"drop the option, or use --preset project to choose it yourself"
            )
