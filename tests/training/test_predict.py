"""Inference on new cases with a saved travel set: PNG/JPG images and NIfTI volumes, on a tiny model
trained for a few seconds to find bright discs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedfms.data.synthetic import make_disc_site
from fedfms.errors import CheckpointError, ConfigError, DataError
from fedfms.models import ModelConfig, build_model, travel_state_dict
from fedfms.training.predict import load_model, predict_cases
from fedfms.training.trainer import LocalTrainer, TrainConfig

MODEL = ModelConfig("tiny", "fedmsa", num_classes=1, pretrained=False, init_seed=0)


def disc_image(rng, height=64, width=64):
    """Same recipe as the synthetic site: noise in [0.1, 0.5] plus 0.35 inside one disc."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    r = rng.uniform(0.15, 0.22) * min(height, width)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return np.clip(rng.uniform(0.1, 0.5, (height, width)) + 0.35 * disc, 0, 1), disc


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A FedMSA travel set after ~2 s of training, saved the way FLARE's persistor saves it."""
    tmp = tmp_path_factory.mktemp("predict")
    site = make_disc_site(tmp / "site", num_volumes=5, slices_per_volume=8)
    trainer = LocalTrainer(MODEL, TrainConfig(lr=1e-3, loss="bce_dice", progress=False), str(site))
    trainer.fit(epochs=12)
    path = tmp / "FL_global_model.pt"
    torch.save({"model": trainer.travel_weights(), "train_conf": {"train": {"model": "tiny"}}}, path)
    return path


def test_png_and_jpg_images(weights_file, tmp_path):
    rng = np.random.default_rng(42)
    grey, grey_disc = disc_image(rng, 64, 64)
    rgb, rgb_disc = disc_image(rng, 80, 80)
    Image.fromarray((grey * 255).astype(np.uint8), "L").save(tmp_path / "grey.png")
    Image.fromarray((np.repeat(rgb[..., None], 3, -1) * 255).astype(np.uint8), "RGB").save(tmp_path / "photo.jpg", quality=95)

    written = predict_cases(MODEL, weights_file, [tmp_path / "grey.png", tmp_path / "photo.jpg"], tmp_path / "out", class_names=["disc"])
    assert [p.name for p in written] == ["grey_disc.png", "photo_disc.png"]
    for path, truth in zip(written, (grey_disc, rgb_disc)):
        with Image.open(path) as im:
            assert im.mode == "L"
            pred = np.asarray(im)
        assert pred.shape == truth.shape  # back at the input size
        assert set(np.unique(pred)) <= {0, 255}
        assert dice(pred > 0, truth) > 0.75, path


def test_nifti_volume(weights_file, tmp_path):
    """Intensities far from [0, 1] (the percentile window must be applied), slices along the last axis,
    the affine kept, one uint8 volume per class."""
    rng = np.random.default_rng(7)
    pairs = [disc_image(rng, 64, 64) for _ in range(4)]
    volume = np.stack([img for img, _ in pairs], axis=-1) * 800.0 - 200.0
    truth = np.stack([d for _, d in pairs], axis=-1)
    affine = np.array([[0.0, -0.8, 0, 10], [0.7, 0.0, 0, -5], [0, 0, 3.0, 2], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), tmp_path / "case01.nii.gz")

    (written,) = predict_cases(MODEL.to_dict(), weights_file, [tmp_path / "case01.nii.gz"], tmp_path / "out")
    assert written.name == "case01_class0.nii.gz"
    out = nib.load(written)
    assert out.shape == volume.shape
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    pred = np.asarray(out.dataobj)
    assert set(np.unique(pred)) <= {0, 1}
    for k in range(volume.shape[-1]):
        assert dice(pred[..., k], truth[..., k]) > 0.75, k


def test_nifti_in_plane_size_is_restored(weights_file, tmp_path):
    volume = np.random.default_rng(0).uniform(size=(50, 70, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "odd.nii")
    (written,) = predict_cases(MODEL, weights_file, [tmp_path / "odd.nii"], tmp_path / "out")
    assert nib.load(written).shape == (50, 70, 3)


def test_multiclass_outputs_one_file_per_class(tmp_path):
    cfg = ModelConfig("tiny", "fedsam", num_classes=2, pretrained=False)
    weights = tmp_path / "w.pt"
    torch.save(travel_state_dict(build_model(cfg), "fedsam"), weights)  # a plain state dict works too
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    nib.save(nib.Nifti1Image(rng.uniform(0, 500, (20, 24, 2)).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    written = predict_cases(cfg, weights, [tmp_path / "x.png", tmp_path / "v.nii.gz"], tmp_path / "out", class_names=["od", "oc"])
    assert [p.name for p in written] == ["x_od.png", "x_oc.png", "v_od.nii.gz", "v_oc.nii.gz"]
    assert np.asarray(Image.open(written[1])).shape == (30, 40)
    assert nib.load(written[3]).shape == (20, 24, 2)


def test_travel_set_is_loaded_on_top_of_the_checkpoint(tmp_path):
    """Frozen parts come from the SAM checkpoint, trained parts from the weights file."""
    from segment_anything.modeling import Sam
    from fedfms.models.registry import build_image_encoder, build_mask_decoder, build_prompt_encoder, get_variant

    v = get_variant("tiny")
    torch.manual_seed(5)
    sam_state = Sam(build_image_encoder(v), build_prompt_encoder(v), build_mask_decoder(v)).state_dict()
    torch.save(sam_state, tmp_path / "sam_tiny.pth")
    cfg = ModelConfig("tiny", "fedmsa", num_classes=1, checkpoint=str(tmp_path / "sam_tiny.pth"))
    trained = {k: torch.randn_like(t) for k, t in travel_state_dict(build_model(cfg), "fedmsa").items()}
    torch.save({"model": trained}, tmp_path / "w.pt")

    model = load_model(cfg, tmp_path / "w.pt")
    state = model.state_dict()
    assert not model.training
    assert torch.equal(state["image_encoder.blocks.0.attn.qkv.weight"], sam_state["image_encoder.blocks.0.attn.qkv.weight"])
    for k, t in trained.items():
        assert torch.equal(state[k], t), k


def test_wrong_weights_are_refused(weights_file, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(MODEL, tmp_path / "nothing.pt")
    # a two-class head cannot take a one-class travel set
    with pytest.raises(CheckpointError, match=r"'head\.weight' has shape \(1, 3, 1, 1\); expected \(2, 3, 1, 1\)"):
        load_model(ModelConfig("tiny", "fedmsa", num_classes=2, pretrained=False), weights_file)
    # a FedMSA travel set lacks the encoder a FedSAM model needs
    with pytest.raises(CheckpointError, match="missing key"):
        load_model(ModelConfig("tiny", "fedsam", num_classes=1, pretrained=False), weights_file)
    partial = {k: v for k, v in torch.load(weights_file)["model"].items() if not k.startswith("head.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\) \['head\.bias'\]"):
        load_model(MODEL, tmp_path / "partial.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="unreadable weights file"):
        load_model(MODEL, tmp_path / "junk.pt")


def test_bad_inputs(weights_file, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / d / "x.png")
    with pytest.raises(DataError, match="share the name 'x'"):
        predict_cases(MODEL, weights_file, [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"], tmp_path / "out")
    (tmp_path / "scan.dcm").write_bytes(b"")
    with pytest.raises(DataError, match=r"scan\.dcm: unsupported input"):
        predict_cases(MODEL, weights_file, [tmp_path / "scan.dcm"], tmp_path / "out")
    with pytest.raises(DataError, match="input file not found"):
        predict_cases(MODEL, weights_file, [tmp_path / "gone.png"], tmp_path / "out")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"broken\.png: unreadable or truncated image"):
        predict_cases(MODEL, weights_file, [tmp_path / "broken.png"], tmp_path / "out")
    with pytest.raises(ConfigError, match="class_names"):
        predict_cases(MODEL, weights_file, [tmp_path / "a" / "x.png"], tmp_path / "out", class_names=["a", "b"])


@pytest.mark.parametrize("two_and_half_d", [False, True])
def test_volume_slices_fed_to_the_model(weights_file, tmp_path, monkeypatch, two_and_half_d):
    """Slice k of the windowed volume is the (centre) channel of input k; 2.5D adds slices k-1 and k+1."""
    import fedfms.training.predict as predict

    volume = np.random.default_rng(3).uniform(0, 1000, size=(12, 10, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    seen = {}

    def fake(model, slices, batch_size=4, amp="auto", resize="pad"):
        seen["slices"] = slices
        yield np.zeros((len(slices), model.num_classes, *slices.shape[1:3]), np.float32)

    monkeypatch.setattr(predict, "batched_probabilities", fake)
    predict_cases(MODEL, weights_file, [tmp_path / "v.nii.gz"], tmp_path / "out", two_and_half_d=two_and_half_d)
    lo, hi = np.percentile(volume, [1, 99])
    windowed = np.clip((volume - lo) / (hi - lo), 0, 1)
    slices = seen["slices"]
    assert slices.shape == (4, 12, 10, 3)
    for k in range(4):
        np.testing.assert_allclose(slices[k, ..., 1], windowed[..., k], atol=1e-6)
        neighbours = (max(k - 1, 0), min(k + 1, 3)) if two_and_half_d else (k, k)
        np.testing.assert_allclose(slices[k, ..., 0], windowed[..., neighbours[0]], atol=1e-6)
        np.testing.assert_allclose(slices[k, ..., 2], windowed[..., neighbours[1]], atol=1e-6)


def test_truncated_nifti_names_the_file(weights_file, tmp_path):
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(size=(32, 32, 8)).astype(np.float32), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match=r"cut\.nii\.gz"):
        predict_cases(MODEL, weights_file, [path], tmp_path / "out")


# ----------------------------------------------------------------------------------------------------
# every input checked before anything is written; outputs all or nothing


def _textured_png(path, seed=0, size=(24, 24)):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def test_a_bad_input_among_good_ones_writes_nothing(weights_file, tmp_path):
    good = _textured_png(tmp_path / "good.png")
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(black)
    out = tmp_path / "new" / "out"
    with pytest.raises(DataError, match=r"black\.png: image is constant \(every pixel is 0\); "
                                        r"expected an image with contrast; nothing was written$"):
        predict_cases(MODEL, weights_file, [good, black], out)
    assert not (tmp_path / "new").exists()
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 3), 7.0, np.float32), np.eye(4)), flat)
    with pytest.raises(DataError, match=r"black\.png: image is constant .* \[1 more bad input\(s\) of 3\]; nothing was written"):
        predict_cases(MODEL, weights_file, [good, black, flat], out)
    with pytest.raises(DataError, match=r"flat\.nii\.gz: volume is constant \(every voxel is 7\)"):
        predict_cases(MODEL, weights_file, [flat], out)


def test_label_like_inputs_are_refused_unless_allowed(weights_file, tmp_path):
    mask = np.zeros((24, 24), np.uint8)
    mask[5:12, 5:12] = 255
    Image.fromarray(mask).save(tmp_path / "case_mask.png")
    seg = np.zeros((16, 16, 3), np.uint8)
    seg[4:9, 4:9, 1] = 2
    nib.save(nib.Nifti1Image(seg, np.eye(4)), tmp_path / "Case00_segmentation.nii.gz")
    for name, match in (("case_mask.png", r"image has only 2 distinct values \[0, 255\]"),
                        ("Case00_segmentation.nii.gz", r"volume has only 2 distinct values \[0, 2\]")):
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: {match}, like a mask or segmentation"):
            predict_cases(MODEL, weights_file, [tmp_path / name], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    written = predict_cases(MODEL, weights_file, [tmp_path / "case_mask.png"], tmp_path / "out", allow_label_like=True)
    assert [p.name for p in written] == ["case_mask_class0.png"]


def test_existing_predictions_are_not_replaced_without_overwrite(weights_file, tmp_path):
    good = _textured_png(tmp_path / "good.png")
    out = tmp_path / "out"
    (first,) = predict_cases(MODEL, weights_file, [good], out)
    first.write_bytes(b"an earlier run's result")
    with pytest.raises(DataError, match=r"good_class0\.png: already exists; expected a new file .*--overwrite.*; nothing was written"):
        predict_cases(MODEL, weights_file, [good], out)
    assert first.read_bytes() == b"an earlier run's result"
    predict_cases(MODEL, weights_file, [good], out, overwrite=True)
    assert np.asarray(Image.open(first)).shape == (24, 24)
    assert sorted(p.name for p in out.iterdir()) == ["good_class0.png"]  # no staging folder left


def test_out_that_is_a_file_and_an_input_that_is_a_folder(weights_file, tmp_path):
    good = _textured_png(tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"notes\.txt: output is a file; expected a folder for the predictions"):
        predict_cases(MODEL, weights_file, [good], tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"cases: is a folder with no image .* or NIfTI .* file in it"):
        predict_cases(MODEL, weights_file, [tmp_path / "cases"], tmp_path / "out")


def test_disk_full_while_writing_keeps_nothing(weights_file, tmp_path, monkeypatch):
    import errno

    inputs = [_textured_png(tmp_path / "a.png", 1), _textured_png(tmp_path / "b.png", 2)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    real_save = Image.Image.save

    def full(self, fp, *a, **k):
        if "b_class0" in str(fp):
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(DataError, match=r"b_class0\.png: could not write predictions \(No space left on device\); nothing was written"):
        predict_cases(MODEL, weights_file, inputs, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # a.png's finished output was not left half a run


def test_16bit_image_is_windowed_by_the_documented_rule(tmp_path):
    from fedfms.training.predict import read_image

    micrograph = np.linspace(200, 3800, 400).reshape(20, 20).astype(np.uint16)
    Image.fromarray(micrograph).save(tmp_path / "m.png")
    image = read_image(tmp_path / "m.png")
    lo, hi = np.percentile(micrograph.astype(np.float32), [1, 99])
    np.testing.assert_allclose(image[..., 0], np.clip((micrograph - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert (image >= 0.999).mean() < 0.05  # not clamped to white


def test_cli_predict_errors_are_one_line_exit_2(weights_file, tmp_path, capsys):
    import json

    from fedfms.cli import main

    good = _textured_png(tmp_path / "good.png")
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(black)
    (tmp_path / "model.json").write_text(json.dumps(MODEL.to_dict()))
    (tmp_path / "bad.json").write_text("{nope")
    base = ["predict", "--weights", str(weights_file), "--out", str(tmp_path / "out")]
    for argv, needle in (
        ([*base, "--model-config", str(tmp_path / "model.json"), str(good), str(black)], "black.png: image is constant"),
        ([*base, "--model-config", str(tmp_path / "bad.json"), str(good)], "bad.json: not valid JSON"),
        ([*base, "--model-config", str(tmp_path / "none.json"), str(good)], "none.json: cannot read the model config"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()
    assert main([*base, "--model-config", str(tmp_path / "model.json"), str(good)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "good_class0.png")
