"""Shapes kept end to end: scores leave the padding out, and ``predict`` returns the input's own shape with edges
as smooth as the logits (SAM's ``postprocess_masks``: interpolate, crop the padding, interpolate, then threshold).

The check scenario of issue 22 runs here on generated data (four sites of PNG tiles with 0/255 masks, one tile
96 x 128; no real microscopy images are on this machine): one ``fedfms prepare images``, a tiny model trained on
the four sites pooled, and ``fedfms predict`` on the odd tile, a TIFF copy of it and a folder."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from fedfms.cli import main
from fedfms.data.geometry import content_shape
from fedfms.data.site_dataset import SiteWriter
from fedfms.data.synthetic import make_raw_tile_sites
from fedfms.evaluation.scoring import score_site
from fedfms.models import ModelConfig
from fedfms.training.metrics import SegmentationMetric
from fedfms.training.predict import batched_logits, load_model, predict_cases, predict_slices
from fedfms.training.trainer import LocalTrainer, TrainConfig

MODEL = ModelConfig("tiny", "fedmsa", num_classes=1, pretrained=False, init_seed=0)


def transitions(mask: np.ndarray) -> np.ndarray:
    """Column positions x where a row changes between x-1 and x, and row positions where a column does."""
    cols = np.nonzero(mask[:, 1:] != mask[:, :-1])[1] + 1
    rows = np.nonzero(mask[1:] != mask[:-1])[0] + 1
    return np.concatenate([cols, rows])


def blocky(logits: torch.Tensor, original, side: int) -> np.ndarray:
    """The old way, for contrast: threshold at the mask size, enlarge with nearest neighbour, crop the padding."""
    h, w = content_shape(*original, side)
    big = F.interpolate((logits > 0).float(), size=(side, side), mode="nearest-exact")[0, 0, :h, :w]
    return F.interpolate(big[None, None], size=tuple(original), mode="nearest-exact")[0, 0].numpy().astype(np.uint8)


def iou(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return (a & b).sum() / max((a | b).sum(), 1)


# ----------------------------------------------------------------------------------------------------
# a model with known logits: a disc in the model's square input


class DiscModel(torch.nn.Module):
    """Logits (radius - distance) / 2 of a disc given in the square input's pixels, at the mask size."""

    image_size, mask_size, num_classes = 128, 32, 1

    def __init__(self, centre, radius):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.centre, self.radius = centre, radius

    def forward(self, images):
        step = self.image_size / self.mask_size
        centres = (torch.arange(self.mask_size, dtype=torch.float32) + 0.5) * step - 0.5
        yy, xx = torch.meshgrid(centres, centres, indexing="ij")
        dist = ((yy - self.centre[0]) ** 2 + (xx - self.centre[1]) ** 2).sqrt()
        return ((self.radius - dist) / 2 + self.anchor).expand(len(images), 1, -1, -1)


def test_the_prediction_is_the_disc_at_the_inputs_own_shape_with_a_smooth_edge():
    # a 48 x 64 input: content 96 x 128 of the 128 square (scale 2), 32 rows of padding
    model = DiscModel(centre=(61.0, 41.0), radius=22.6)
    slices = np.random.default_rng(0).uniform(0, 1, (1, 48, 64, 3)).astype(np.float32)
    mask = predict_slices(model, slices)[0, 0]
    assert mask.shape == (48, 64)
    yy, xx = np.mgrid[:48, :64]
    truth = (yy - (61.0 + 0.5) / 2 + 0.5) ** 2 + (xx - (41.0 + 0.5) / 2 + 0.5) ** 2 <= (22.6 / 2) ** 2
    assert iou(mask, truth) > 0.93  # where the disc is, at its size: nothing shifted or stretched
    old = blocky(next(batched_logits(model, slices)), (48, 64), 128)
    steps = transitions(old)
    assert (steps % 2 == 0).all()  # the old way steps in blocks of 128/32/2 = 2 input pixels ...
    assert (transitions(mask) % 2 == 1).mean() > 0.3  # ... the interpolated edge does not
    assert iou(mask, truth) > iou(old, truth)


def test_padding_is_cropped_off_not_squeezed_in():
    """A disc drawn in the padded square's content maps back to the same place; a stretched reading would not."""
    model = DiscModel(centre=(40.0, 100.0), radius=15.0)  # in the content of a 64 x 128 -> 64 x 128 square input
    slices = np.random.default_rng(1).uniform(0, 1, (2, 64, 128, 3)).astype(np.float32)
    padded = predict_slices(model, slices)[0, 0]
    stretched = predict_slices(model, slices, resize="stretch")[0, 0]
    rows = np.flatnonzero(padded.any(axis=1))
    assert abs(rows.mean() - 40) < 1.5 and padded.shape == (64, 128)
    srows = np.flatnonzero(stretched.any(axis=1))
    assert abs(srows.mean() - 20) < 1.5  # the stretched reading squeezes the 128 rows into 64


# ----------------------------------------------------------------------------------------------------
# scores: a padded pixel neither helps nor hurts


def test_metric_ignores_the_padding():
    truth = torch.zeros(1, 1, 16, 16)
    truth[0, 0, 2:6, 2:10] = 1
    logits = torch.full((1, 1, 16, 16), -5.0)
    logits[0, 0, 2:6, 2:8] = 5.0  # 24 of the 32 true pixels
    valid = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    valid[..., :8, :] = True  # the bottom half is padding
    crop = SegmentationMetric(["c"])
    crop.update(logits[..., :8, :], truth[..., :8, :], ["v"])
    expected = crop.aggregate()
    for pad_logits in (-5.0, 5.0):  # a prediction in the padding must not lower the score ...
        for pad_truth in (0.0, 1.0):  # ... nor can ground truth there (a corrupt file) raise or lower it
            x, t = logits.clone(), truth.clone()
            x[..., 8:, :], t[..., 8:, :] = pad_logits, pad_truth
            metric = SegmentationMetric(["c"])
            metric.update(x, t, ["v"], valid)
            got = metric.aggregate()
            for key in ("dice", "iou", "volume_dice", "dice_reference", "iou_reference"):
                assert got[key] == pytest.approx(expected[key]), (key, pad_logits, pad_truth)
    unmasked = SegmentationMetric(["c"])
    x = logits.clone()
    x[..., 8:, :] = 5.0
    unmasked.update(x, truth, ["v"])
    assert unmasked.aggregate()["dice"] < expected["dice"] - 0.2  # without the valid map, the padding would count


class Everywhere(torch.nn.Module):
    """Predicts the class on every pixel."""

    image_size, mask_size, num_classes = 64, 16, 1

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        return torch.full((len(images), 1, self.mask_size, self.mask_size), 10.0) + self.w


def test_scoring_a_site_leaves_each_samples_padding_out(tmp_path):
    site = tmp_path / "site"
    truth = np.zeros((32, 64), np.uint8)
    truth[:, :32] = 1  # the left half of a 32 x 64 image
    with SiteWriter(site, "s", "synthetic", ["c"], 64, 16) as writer:
        writer.add(np.random.default_rng(0).integers(0, 255, (32, 64), dtype=np.uint8), truth, "p1")
    row = score_site(Everywhere(), site)
    assert row["dice"] == pytest.approx(2 * 0.5 / 1.5)  # content only: half of it is the class
    assert row["num_samples"] == 1


# ----------------------------------------------------------------------------------------------------
# the check scenario, end to end


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """Four sites of generated PNG tiles (one 96 x 128), prepared in one command; a tiny model trained on them."""
    tmp = tmp_path_factory.mktemp("own")
    raw = make_raw_tile_sites(tmp / "raw", sites=4, tiles=10, odd=(96, 128), seed=3)
    assert main(["prepare", "images", "--raw", str(raw), "--out", str(tmp / "sites"), "--classes", "nuclei",
                 "--image-size", "128", "--mask-size", "32"]) == 0
    sites = [str(tmp / "sites" / f"site{k}") for k in range(1, 5)]
    trainer = LocalTrainer(MODEL, TrainConfig(lr=1e-3, loss="bce_dice", progress=False, val_fraction=0.1), sites)
    trainer.fit(epochs=12)
    weights = tmp / "FL_global_model.pt"
    torch.save({"model": trainer.travel_weights()}, weights)
    (tmp / "model.json").write_text(json.dumps(MODEL.to_dict()))
    return tmp, raw, weights, trainer.evaluate("val")


def test_the_model_learned_on_padded_sites(scenario):
    _, _, _, val = scenario
    assert val["num_samples"] >= 4 and val["dice"] > 0.75


def test_predict_returns_the_odd_tiles_shape_without_blocks(scenario, tmp_path):
    tmp, raw, weights, _ = scenario
    tile = raw / "site1" / "images" / "tile0.png"
    (written,) = predict_cases(MODEL, weights, [tile], tmp_path / "out", class_names=["nuclei"])
    pred = np.asarray(Image.open(written)) > 0
    truth = np.asarray(Image.open(raw / "site1" / "masks" / "tile0.png")) > 0
    assert pred.shape == (96, 128)
    assert iou(pred, truth) > 0.7  # the disc where it is, round

    model = load_model(MODEL, weights)
    image = np.asarray(Image.open(tile), dtype=np.float32)[None, ..., None].repeat(3, -1) / 255.0
    old = blocky(next(batched_logits(model, image)), (96, 128), model.image_size)
    assert (transitions(old) % 4 == 0).all()  # the old way: every edge on the 4-pixel grid of the 32 x 32 mask
    edge = transitions(pred)
    assert len(edge) > 20 and (edge % 4 != 0).mean() > 0.5  # this edge is not
    assert (pred != old).sum() > 0


def test_tiff_inputs_and_probabilities(scenario, tmp_path):
    tmp, raw, weights, _ = scenario
    tile = np.asarray(Image.open(raw / "site1" / "images" / "tile0.png"))
    tifffile.imwrite(tmp_path / "tile0_8bit.tif", tile)
    tifffile.imwrite(tmp_path / "tile0_16bit.tiff", tile.astype(np.uint16) * 16 + 7)  # 12-bit data, windowed
    written = predict_cases(MODEL, weights, [tmp_path / "tile0_8bit.tif", tmp_path / "tile0_16bit.tiff"], tmp_path / "out",
                            class_names=["nuclei"], probabilities=True)
    assert [p.name for p in written] == ["tile0_8bit_nuclei.png", "tile0_8bit_nuclei_prob.tif",
                                         "tile0_16bit_nuclei.png", "tile0_16bit_nuclei_prob.tif"]
    truth = np.asarray(Image.open(raw / "site1" / "masks" / "tile0.png")) > 0
    for mask_path, prob_path in (written[:2], written[2:]):
        mask = np.asarray(Image.open(mask_path)) > 0
        prob = tifffile.imread(prob_path)
        assert mask.shape == prob.shape == (96, 128) and prob.dtype == np.float32
        assert 0 <= prob.min() and prob.max() <= 1 and 0.01 < prob.mean() < 0.99
        np.testing.assert_array_equal(mask, prob > 0.5)  # the mask is the soft map thresholded
        assert iou(mask, truth) > 0.6


def test_nifti_probabilities_and_non_square_slices(scenario, tmp_path):
    _, _, weights, _ = scenario
    rng = np.random.default_rng(5)
    volume = rng.uniform(100, 500, (48, 64, 3)).astype(np.float32)
    yy, xx = np.mgrid[:48, :64]
    volume[(yy - 24) ** 2 + (xx - 40) ** 2 < 100] += 400
    nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 3.0, 1.0])), tmp_path / "v.nii.gz")
    mask_path, prob_path = predict_cases(MODEL, weights, [tmp_path / "v.nii.gz"], tmp_path / "out", probabilities=True)
    assert prob_path.name == "v_class0_prob.nii.gz"
    mask, prob = nib.load(mask_path), nib.load(prob_path)
    assert mask.shape == prob.shape == (48, 64, 3) and prob.get_data_dtype() == np.float32
    np.testing.assert_allclose(prob.affine, np.diag([0.7, 0.7, 3.0, 1.0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), (np.asarray(prob.dataobj) > 0.5).astype(np.uint8))


def test_cli_predicts_a_folder(scenario, tmp_path, capsys):
    tmp, raw, weights, _ = scenario
    folder = raw / "site2" / "images"
    (tmp_path / "in").mkdir()
    for p in sorted(folder.iterdir())[:3]:
        (tmp_path / "in" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "in" / "readme.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(weights), "--model-config", str(tmp / "model.json"), "--classes", "nuclei",
                 "--out", str(out), str(tmp_path / "in")]) == 0
    printed = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["tile0_nuclei.png", "tile1_nuclei.png", "tile2_nuclei.png"]
    assert printed.out.strip().splitlines() == [str(out / n) for n in ("tile0_nuclei.png", "tile1_nuclei.png", "tile2_nuclei.png")]
    assert "1 file(s) that are not images or NIfTI volumes left out (readme.txt)" in printed.err


def test_files_of_different_sizes_batched_together_match_one_at_a_time(scenario, tmp_path):
    _, raw, weights, _ = scenario
    tiles = [raw / "site1" / "images" / f"tile{k}.png" for k in range(4)]  # tile0 is 96 x 128, the others 128 x 128
    one = predict_cases(MODEL, weights, tiles, tmp_path / "one", batch_size=1, probabilities=True)
    many = predict_cases(MODEL, weights, tiles, tmp_path / "many", batch_size=8, probabilities=True)
    assert [p.name for p in one] == [p.name for p in many]
    for a, b in zip(one, many):
        if a.suffix == ".tif":
            np.testing.assert_allclose(tifffile.imread(a), tifffile.imread(b), atol=1e-5)
        else:
            assert np.asarray(Image.open(a)).shape == np.asarray(Image.open(b)).shape
            assert (np.asarray(Image.open(a)) != np.asarray(Image.open(b))).mean() < 1e-3
    assert np.asarray(Image.open(one[0])).shape == (96, 128)
