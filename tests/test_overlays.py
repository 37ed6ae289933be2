"""The one drawing of predictions (report figure, demo figure, predict --overlay)."""

import numpy as np
import pytest

from fedfms.overlays import GT_COLOUR, PRED_COLOUR, dice, montage, outline, overlay


def test_overlay_draws_prediction_in_red_and_truth_in_green_at_the_image_size():
    image = np.full((8, 8), 0.5, dtype=np.float32)
    pred = np.zeros((4, 4), bool)
    pred[1:3, 1:3] = True  # a quarter-size mask: each pixel covers 2x2 image pixels
    truth = np.zeros((8, 8), bool)
    truth[5:8, 5:8] = True
    rgb = overlay(image, pred, truth)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[2, 2]) == tuple((PRED_COLOUR * 255).round().astype(int))  # the prediction's outline
    assert tuple(rgb[6, 5]) == tuple((GT_COLOUR * 255).round().astype(int))  # the truth's outline
    assert tuple(rgb[0, 7]) == (128, 128, 128)  # untouched grey
    filled = overlay(image, truth=truth, fill_truth=True)
    assert filled[6, 6, 1] > filled[6, 6, 0]  # inside the truth: tinted green
    assert tuple(overlay(image, truth=truth)[6, 6]) == (128, 128, 128)  # outline only
    chw = overlay(np.zeros((3, 8, 8)) + 0.25)
    assert tuple(chw[0, 0]) == (64, 64, 64)
    with pytest.raises(ValueError, match="expected"):
        overlay(np.zeros((2, 2, 2, 2)))


def test_outline_dice_and_montage():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    assert outline(m).sum() == 8 and not outline(m)[2, 2]
    assert dice(m, m) == 1.0 and dice(m, np.zeros_like(m)) == 0.0 and dice(np.zeros_like(m), np.zeros_like(m)) is None
    tiles = [np.zeros((4, 6, 3), np.uint8)] * 3
    grid = montage(tiles, columns=2, gap=1)
    assert grid.shape == (9, 13, 3) and grid[4, 0, 0] == 255 and grid[-1, -1, 0] == 255
