"""How an image of any shape becomes the model's square input, and how a prediction goes back to that shape.

Two rules (``resize``), recorded in every prepared site's manifest (docs/data-format.md):

* ``pad`` (the default): SAM's own preprocessing. The longest side is scaled to the square's side and the other
  side by the same factor (segment-anything's ``ResizeLongestSide.get_preprocess_shape``), then the image is
  padded with zeros at the bottom and the right. Shapes are kept: a 96 x 128 tile becomes 768 x 1024 content plus
  256 rows of padding in a 1024 square. Masks get the same treatment at the mask size (nearest neighbour).
* ``stretch``: both sides scaled to the square independently, the aspect ratio lost (the paper code's
  ``cv2.resize(img, (1024, 1024))``; ``fedfms prepare --preset reference``).

Going back (:func:`restore_logits`) follows SAM's ``Sam.postprocess_masks``: the logits are upsampled bilinearly
to the square input, the padding is cropped off, and what is left is upsampled bilinearly to the original size.
Thresholds apply only after that, so a prediction's edge is as smooth as the logits, not a staircase of
mask-size pixels.

The region a sample's content covers (:func:`content_shape`) is what scores are computed on: a padded pixel is
neither foreground nor background to Dice and IoU (:mod:`fedfms.training.metrics`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fedfms.errors import ConfigError

PAD = "pad"
STRETCH = "stretch"
RESIZE_MODES = (PAD, STRETCH)
# What a manifest written before the aspect ratio was kept means: every image was stretched to the square.
LEGACY_RESIZE = STRETCH


def check_resize(mode) -> str:
    if mode not in RESIZE_MODES:
        raise ConfigError(f"resize is {mode!r}; expected {PAD} (keep the aspect ratio, pad; SAM's way) or "
                          f"{STRETCH} (scale both sides to the square; the paper code's way)")
    return mode


def longest_side_shape(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) with the longer of ``height``/``width`` scaled to ``side`` and the other by the same factor, rounded
    as segment-anything's ``ResizeLongestSide.get_preprocess_shape`` rounds (never below one pixel)."""
    scale = side * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def content_shape(height: int, width: int, side: int, mode: str = PAD) -> tuple[int, int]:
    """The part of a ``side`` x ``side`` square an image of ``height`` x ``width`` fills under ``mode``; the rest
    (bottom rows, right columns) is padding."""
    if check_resize(mode) == STRETCH:
        return side, side
    return longest_side_shape(height, width, side)


def resize_image(image: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a (C,H,W) or (B,C,H,W) float image to ``size`` (a side, or (h, w)); antialiased when
    either side shrinks."""
    target = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if tuple(image.shape[-2:]) == target:
        return image
    batched = image.dim() == 4
    x = image if batched else image[None]
    shrinking = x.shape[-2] > target[0] or x.shape[-1] > target[1]
    out = F.interpolate(x.float(), size=target, mode="bilinear", align_corners=False, antialias=shrinking)
    return out if batched else out[0]


# Nearest-neighbour rules for masks, as torch's interpolate modes. Output pixel i of n, from an input side of m:
# "nearest-exact" takes input pixel floor((i + 0.5) * m / n), the one whose centre is nearest (this project);
# "nearest" takes floor(i * m / n), as OpenCV's INTER_NEAREST does (the paper code's preprocessing).
MASK_RESIZES = ("nearest-exact", "nearest")
DEFAULT_MASK_RESIZE = "nearest-exact"


def resize_mask(mask: torch.Tensor, size: int | Sequence[int], rule: str = DEFAULT_MASK_RESIZE) -> torch.Tensor:
    """Nearest-neighbour resize of a (C,H,W) binary mask to ``size`` (a side, or (h, w)): labels are never blended.
    ``rule``: one of :data:`MASK_RESIZES`."""
    if rule not in MASK_RESIZES:
        raise ValueError(f"mask resize rule is {rule!r}; expected one of {', '.join(MASK_RESIZES)}")
    target = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if tuple(mask.shape[-2:]) == target:
        return mask
    return F.interpolate(mask[None].float(), size=target, mode=rule)[0]


def _pad_to(x: torch.Tensor, side: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return x if (h, w) == (side, side) else F.pad(x, (0, side - w, 0, side - h))


def fit_image(image: torch.Tensor, side: int, mode: str = PAD) -> torch.Tensor:
    """A (C,H,W) or (B,C,H,W) float image as the ``side`` x ``side`` square the model takes (module docstring)."""
    if check_resize(mode) == STRETCH:
        return resize_image(image, side)
    return _pad_to(resize_image(image, content_shape(*image.shape[-2:], side)), side)


def fit_mask(mask: torch.Tensor, side: int, mode: str = PAD, rule: str = DEFAULT_MASK_RESIZE) -> torch.Tensor:
    """A (C,H,W) {0,1} mask as the ``side`` x ``side`` square (nearest neighbour by ``rule``, zeros in the padding)."""
    if check_resize(mode) == STRETCH:
        return resize_mask(mask, side, rule)
    return _pad_to(resize_mask(mask, content_shape(*mask.shape[-2:], side), rule), side)


def valid_region(original: Sequence[int] | None, side: int, mode: str) -> torch.Tensor:
    """(1, side, side) bool: True where a sample of ``original`` (H, W) size has content at a square of ``side``
    (everything when the sample was stretched or its size is unknown)."""
    valid = torch.zeros(1, side, side, dtype=torch.bool)
    h, w = (side, side) if mode != PAD or not original else content_shape(int(original[0]), int(original[1]), side)
    valid[:, :h, :w] = True
    return valid


def restore_logits(logits: torch.Tensor, original: Sequence[int], input_side: int, mode: str = PAD) -> torch.Tensor:
    """(B,C,m,m) logits of a ``input_side`` square input -> (B,C,H,W) logits at the ``original`` (H, W) size:
    bilinear to the input square, padding cropped off, bilinear to the original size (SAM's
    ``Sam.postprocess_masks``). Threshold the result, never the mask-size logits."""
    h, w = content_shape(int(original[0]), int(original[1]), input_side, check_resize(mode))
    x = F.interpolate(logits.float(), (input_side, input_side), mode="bilinear", align_corners=False)
    x = x[..., :h, :w]
    return F.interpolate(x, (int(original[0]), int(original[1])), mode="bilinear", align_corners=False)
