"""Pictures of predictions: an image with its ground truth and a model's prediction drawn on it.

One drawing for every place that shows a prediction (``fedfms report --png``, the demo's figure, ``fedfms predict
--overlay``), made with numpy only: the grey image, the ground truth as a green outline and the prediction as a
red fill with a red outline. Masks of another size than the image (the models predict at a quarter of the input
size) are scaled to the image with nearest neighbour, so every mask pixel shows as a block.
"""

from __future__ import annotations

import numpy as np

GT_COLOUR = np.array([0.1, 0.9, 0.2])  # green outline
PRED_COLOUR = np.array([1.0, 0.15, 0.1])  # red fill and outline
PRED_ALPHA = 0.35
LEGEND = "green outline: ground truth; red: prediction"


def _grey(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (H, W) float in [0, 1]."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3:
        x = x.mean(axis=0) if x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3) else x.mean(axis=-1)
    if x.ndim != 2:
        raise ValueError(f"image has shape {np.shape(image)}; expected (H, W), (H, W, C) or (C, H, W)")
    return np.clip(x, 0.0, 1.0)


def _to_size(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour scaling of a 2D mask to ``shape``."""
    m = np.asarray(mask) > 0
    if m.ndim != 2:
        raise ValueError(f"mask has shape {m.shape}; expected (H, W)")
    if m.shape == tuple(shape):
        return m
    rows = (np.arange(shape[0]) * m.shape[0] // shape[0]).clip(0, m.shape[0] - 1)
    cols = (np.arange(shape[1]) * m.shape[1] // shape[1]).clip(0, m.shape[1] - 1)
    return m[rows][:, cols]


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return m[1:-1, 1:-1] & ~inner


def overlay(image: np.ndarray, prediction: np.ndarray | None = None, truth: np.ndarray | None = None,
            fill_truth: bool = False) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` in grey, ``prediction`` as a red fill and outline, ``truth`` as a green outline
    (also filled with ``fill_truth``: the ground-truth picture itself)."""
    grey = _grey(image)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if prediction is not None:
        p = _to_size(prediction, grey.shape)
        rgb[p] = (1 - PRED_ALPHA) * rgb[p] + PRED_ALPHA * PRED_COLOUR
        rgb[outline(p)] = PRED_COLOUR
    if truth is not None:
        t = _to_size(truth, grey.shape)
        if fill_truth:
            rgb[t] = (1 - PRED_ALPHA) * rgb[t] + PRED_ALPHA * GT_COLOUR
        rgb[outline(t)] = GT_COLOUR
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float | None:
    """Dice of two binary masks (None when both are empty: the slice is left out, as in the project's rule)."""
    p, t = np.asarray(prediction) > 0, np.asarray(truth) > 0
    total = int(p.sum() + t.sum())
    return None if total == 0 else 2.0 * int((p & t).sum()) / total


def montage(tiles: list[np.ndarray], columns: int, gap: int = 2) -> np.ndarray:
    """Equal-sized (H, W, 3) uint8 tiles in a grid, white gaps between them."""
    if not tiles:
        raise ValueError("no tiles to arrange")
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    out = np.full((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = tile
    return out
