"""The rules by which image intensities enter the project, and what is refused (docs/data-format.md).

Every image or volume that enters — ``fedfms prepare``, :class:`~fedfms.data.site_dataset.SiteWriter`,
``fedfms predict`` — goes through these checks, so nothing is clamped or guessed silently:

* **uint8** is divided by 255.
* **float** must already be in [0, 1]: values within ``FLOAT_TOLERANCE`` of the range (float rounding) are
  clipped, anything further out is refused with the range it has. NaN/inf are refused.
* **uint16, other integer types, floats outside [0, 1]** are refused, unless the caller asks for the
  ``"window"`` rule: map the image's own 1st..99th percentile linearly to [0, 1] and clip (the rule 3D volumes
  get, :func:`fedfms.data.volumes.window_percentiles`). A 12-bit micrograph stored as uint16 thus keeps its
  contrast instead of being divided by 65535 or clamped to white.
* **constant** data (every value equal) carries nothing to learn or segment and is refused.
* **label-like** data (integral values, at most ``LABEL_LIKE_MAX_VALUES`` distinct ones) is a segmentation or
  mask passed where an image was expected; it is refused where that is unambiguous (prepare's images, predict).
"""

from __future__ import annotations

import numpy as np

from fedfms.errors import DataError

FLOAT_TOLERANCE = 1e-4
LABEL_LIKE_MAX_VALUES = 16
UNIT_RULES = ("unit", "window")
_SAMPLE = 65536  # values looked at before a full np.unique when deciding "label-like"


def fmt(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"


def value_range(array: np.ndarray) -> str:
    return f"[{fmt(np.min(array))}, {fmt(np.max(array))}]"


def constant_value(array: np.ndarray):
    """The single value of ``array`` when every element is equal, else None."""
    a = np.asarray(array)
    if a.size == 0:
        return None
    first = a.flat[0]
    return first if (a == first).all() else None


def label_like_values(array: np.ndarray, max_values: int = LABEL_LIKE_MAX_VALUES) -> list | None:
    """The distinct values of ``array`` when it looks like a label map rather than an image (only whole
    numbers, at most ``max_values`` distinct, at least two); otherwise None. Cheap on real images: a sample
    of the values rules most of them out before anything is sorted in full."""
    a = np.asarray(array)
    if a.size == 0 or a.dtype == bool:
        return None if a.size == 0 else [0, 1]
    flat = a.reshape(-1)
    step = max(1, flat.size // _SAMPLE)
    probe = flat[::step]
    if np.issubdtype(a.dtype, np.floating) and (not np.isfinite(probe).all() or (probe != np.round(probe)).any()):
        return None
    if len(np.unique(probe)) > max_values:
        return None
    if np.issubdtype(a.dtype, np.floating) and (flat != np.round(flat)).any():
        return None
    values = np.unique(flat)
    if len(values) > max_values or len(values) < 2:
        return None
    return [int(v) for v in values]


def check_content(array: np.ndarray, where: str, what: str = "image", allow_label_like: bool = False) -> None:
    """Refuse constant data and, unless ``allow_label_like``, data that looks like a label map.
    ``where`` is the file (or sample) named in the message; ``what`` is "image" or "volume"."""
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).any():
        raise DataError(f"{where}: {what} is all NaN/inf; expected finite intensities")
    value = constant_value(a)
    if value is not None:
        unit = "voxel" if what == "volume" else "pixel"
        raise DataError(f"{where}: {what} is constant (every {unit} is {fmt(value)}); expected an image with contrast")
    if not allow_label_like:
        values = label_like_values(a)
        if values is not None:
            shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
            raise DataError(
                f"{where}: {what} has only {len(values)} distinct values [{shown}], like a mask or segmentation; "
                f"expected an intensity image (is a label file among the images?)"
            )


def window(array: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0, where: str = "image", what: str = "image") -> np.ndarray:
    """``array`` mapped linearly so its ``low_pct`` percentile is 0 and ``high_pct`` percentile is 1, clipped,
    as float32. Refused (DataError naming ``where``) when the window is empty: a constant input, or one whose two
    percentiles coincide (e.g. a mostly-zero volume), would otherwise become an all-black image."""
    v = np.asarray(array, dtype=np.float32)
    if not np.isfinite(v).all():
        raise DataError(f"{where}: {what} contains NaN/inf values; expected finite intensities")
    check_content(v, where, what, allow_label_like=True)
    lo, hi = np.percentile(v, [low_pct, high_pct])
    if not hi > lo:
        share = float(np.mean(v == lo))
        raise DataError(
            f"{where}: intensity window is empty: percentiles {fmt(low_pct)} and {fmt(high_pct)} are both {fmt(lo)} "
            f"({share:.0%} of the values; range {value_range(v)}); expected contrast inside the window (try --low-pct/--high-pct)"
        )
    return np.clip((v - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)


def to_unit_range(image: np.ndarray, rule: str, where: str) -> np.ndarray:
    """An image of any dtype -> float32 in [0, 1] by ``rule`` ("unit" or "window", see the module docstring)."""
    if rule not in UNIT_RULES:
        raise DataError(f"intensity rule is {rule!r}; expected one of {', '.join(UNIT_RULES)}")
    a = np.asarray(image)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DataError(f"{where}: image dtype is {a.dtype}; expected uint8, or float in [0, 1]")
    if a.size == 0:
        raise DataError(f"{where}: image is empty (shape {a.shape}); expected pixels")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise DataError(f"{where}: image has NaN/inf values; expected finite intensities in [0, 1]")
    if rule == "window":
        return window(a, where=where)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(a.dtype, np.integer):
        raise DataError(
            f"{where}: image is {a.dtype} with values {value_range(a)}; expected uint8, or float in [0, 1] "
            f"(scale it yourself, or use intensity='window': each image's 1st..99th percentile -> [0, 1])"
        )
    lo, hi = float(np.min(a)), float(np.max(a))
    if lo < -FLOAT_TOLERANCE or hi > 1.0 + FLOAT_TOLERANCE:
        raise DataError(
            f"{where}: float image values span {value_range(a)}; expected [0, 1] "
            f"(scale it yourself, or use intensity='window': each image's 1st..99th percentile -> [0, 1])"
        )
    return np.clip(a.astype(np.float32), 0.0, 1.0)
