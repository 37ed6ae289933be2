"""A hospital's own data, as it comes: ``fedfms prepare images`` / ``fedfms prepare volumes`` on generated folders
(one folder per site), the aspect ratio kept (SAM's longest side + padding), and every refusal in one line.

The tiles are generated (bright discs on noise, :func:`fedfms.data.synthetic.make_raw_tile_sites`); no real
microscopy images are on this machine."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from fedfms.cli import main
from fedfms.data import geometry
from fedfms.data.preparers.registry import prepare
from fedfms.data.site_dataset import SiteDataset, SiteWriter, read_manifest, unpack_mask
from fedfms.data.synthetic import disc_tile, make_raw_tile_sites
from fedfms.errors import ConfigError, DataError

SMALL = dict(image_size=64, mask_size=32)


def png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return path


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def textured(h, w, seed=0):
    return np.random.default_rng(seed).integers(20, 230, (h, w), dtype=np.uint8)


def extent(mask):
    """(rows, columns) the foreground spans."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


# ----------------------------------------------------------------------------------------------------
# the check scenario: four sites of PNG tiles with 0/255 masks, one tile 96 x 128


def test_one_command_prepares_four_sites_and_the_odd_tile_keeps_its_aspect(tmp_path, capsys):
    raw = make_raw_tile_sites(tmp_path / "raw", sites=4, tiles=3, odd=(96, 128))
    out = tmp_path / "out"
    assert main(["prepare", "images", "--raw", str(raw), "--out", str(out), "--classes", "nuclei",
                 "--image-size", "256", "--mask-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "images: 4 site(s) ready" in printed
    assert sorted(p.name for p in out.iterdir()) == ["site1", "site2", "site3", "site4"]

    m = read_manifest(out / "site1")
    assert m.resize == "pad" and m.classes == ["nuclei"] and m.dataset == "images"
    odd = next(s for s in m.samples if s.id == "tile0")
    assert odd.size == [96, 128] and odd.pad == [64, 0]  # 96 x 128 -> 192 x 256 content + 64 padded rows
    square = next(s for s in m.samples if s.id == "tile1")
    assert square.size == [128, 128] and square.pad == [0, 0]
    raw_manifest = json.loads((out / "site1" / "manifest.json").read_text())
    assert raw_manifest["resize"] == "pad" and raw_manifest["samples"][0]["pad"] == [64, 0]

    image = read_png(out / "site1" / "images" / "tile0.png")
    assert image.shape == (256, 256, 3)
    assert (image[192:] == 0).all() and image[:192].std() > 10  # padded rows at the bottom, content above
    mask = unpack_mask(read_png(out / "site1" / "masks" / "tile0.png"), 1)[0]
    assert not mask[48:].any()  # no mask in the padding (64 * 96/128 = 48 content rows)
    truth = read_png(raw / "site1" / "masks" / "tile0.png") > 0
    h, w = extent(mask)
    th, tw = extent(truth)
    assert abs(h / w - th / tw) < 0.1  # the disc stays round: not elongated 4:3

    item = SiteDataset(out / "site1")[m.samples.index(odd)]
    assert item["valid"].shape == (1, 64, 64) and item["valid"][0, :48].all() and not item["valid"][0, 48:].any()


def test_stretch_is_still_available_and_the_manifest_says_so(tmp_path):
    raw = make_raw_tile_sites(tmp_path / "raw", sites=1, tiles=2, odd=(96, 128))
    prepare("images", raw, tmp_path / "out", resize="stretch", **SMALL, summary=False)
    m = read_manifest(tmp_path / "out" / "site1")
    assert m.resize == "stretch" and m.samples[0].size == [96, 128] and m.samples[0].pad is None
    mask = unpack_mask(read_png(tmp_path / "out" / "site1" / "masks" / "tile0.png"), 1)[0]
    h, w = extent(mask)
    truth = read_png(raw / "site1" / "masks" / "tile0.png") > 0
    th, tw = extent(truth)
    assert h / w > 1.2 * th / tw  # stretched: the round disc became a tall ellipse
    assert bool(SiteDataset(tmp_path / "out" / "site1")[0]["valid"].all())


def test_rerun_is_exact_and_another_resize_refuses(tmp_path, capsys):
    raw = make_raw_tile_sites(tmp_path / "raw", sites=2, tiles=2)
    out = tmp_path / "out"
    prepare("images", raw, out, **SMALL, summary=False)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*.png"))}
    capsys.readouterr()
    prepare("images", raw, out, **SMALL, summary=False)
    assert capsys.readouterr().err.count("already prepared") == 2
    with pytest.raises(DataError, match=r"site1: already prepared with different settings \(resize 'pad' -> 'stretch'\)"):
        prepare("images", raw, out, resize="stretch", **SMALL, summary=False)
    prepare("images", raw, tmp_path / "again", **SMALL, summary=False)
    again = {p: p.read_bytes() for p in sorted((tmp_path / "again").rglob("*.png"))}
    assert list(before.values()) == list(again.values())  # the same files, byte for byte
    png(raw / "site2" / "images" / "tile1.png", textured(128, 128, seed=9))  # a raw file changes
    with pytest.raises(DataError, match=r"site2: raw inputs differ .*1 case\(s\) changed \(tile1\)"):
        prepare("images", raw, out, sites=["site2"], **SMALL, summary=False)


def test_manifests_written_before_padding_load_as_stretched(tmp_path):
    site = tmp_path / "site"
    with SiteWriter(site, "old", "synthetic", ["disc"], 32, 16) as writer:
        writer.add(textured(24, 32), np.zeros((24, 32), np.uint8), "p1")
    manifest = json.loads((site / "manifest.json").read_text())
    del manifest["resize"]
    for sample in manifest["samples"]:
        sample.pop("size"), sample.pop("pad")
    (site / "manifest.json").write_text(json.dumps(manifest))
    m = read_manifest(site)
    assert m.resize == "stretch" and m.samples[0].size is None and m.samples[0].pad is None
    assert bool(SiteDataset(site)[0]["valid"].all())  # no padding known: every pixel is scored, as before
    manifest["resize"] = "squash"
    (site / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"field 'resize' is 'squash'; expected one of pad, stretch"):
        read_manifest(site)


def test_an_old_stretched_output_is_not_taken_as_prepared_under_padding(tmp_path):
    raw = make_raw_tile_sites(tmp_path / "raw", sites=1, tiles=2)
    out = tmp_path / "out"
    prepare("images", raw, out, **SMALL, summary=False)
    path = out / "site1" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["resize"]  # as written before the aspect ratio was kept
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"already prepared with different settings \(resize 'stretch' -> 'pad'\)"):
        prepare("images", raw, out, **SMALL, summary=False)


def test_a_reference_output_of_before_padding_is_still_prepared(tmp_path, capsys):
    """--preset reference stretches, as every output did before padding existed: such an output is still current."""
    raw = tmp_path / "raw"
    png(raw / "REFUGE" / "images" / "g1.png", np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    mask = np.full((20, 24), 255, np.uint8)
    mask[4:16, 6:18], mask[8:12, 10:14] = 128, 0
    png(raw / "REFUGE" / "masks" / "g1.png", mask)
    out = tmp_path / "out"
    prepare("fundus", raw, out, sites=["REFUGE"], preset="reference", **SMALL, summary=False)
    path = out / "REFUGE" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["resize"] == "stretch"
    del manifest["resize"]
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    prepare("fundus", raw, out, sites=["REFUGE"], preset="reference", **SMALL, summary=False)
    assert "REFUGE: already prepared" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--resize is pad, but --preset reference sets it to stretch"):
        prepare("fundus", raw, out, sites=["REFUGE"], preset="reference", resize="pad", **SMALL, summary=False)


# ----------------------------------------------------------------------------------------------------
# classes: one file holding every class, index-coded; or one file per class


def test_index_coded_and_per_class_masks(tmp_path):
    raw = tmp_path / "raw"
    disc = np.zeros((20, 30), np.uint8)
    disc[4:16, 6:24] = 1
    cup = np.zeros_like(disc)
    cup[8:12, 12:18] = 1
    # site A: one index-coded file (0 background, 1 disc, 2 cup); the classes do not overlap
    png(raw / "A" / "images" / "x.png", textured(20, 30))
    png(raw / "A" / "masks" / "x.png", disc + cup)
    # site B: one 0/255 file per class; the disc covers the cup
    png(raw / "B" / "images" / "y.jpg", textured(20, 30, seed=1))
    png(raw / "B" / "masks" / "y_disc.png", disc * 255)
    png(raw / "B" / "masks" / "y_cup.png", cup * 255)
    prepare("images", raw, tmp_path / "out", classes="disc,cup", image_size=30, mask_size=30, summary=False)
    a = unpack_mask(read_png(tmp_path / "out" / "A" / "masks" / "x.png"), 2)
    b = unpack_mask(read_png(tmp_path / "out" / "B" / "masks" / "y.png"), 2)
    np.testing.assert_array_equal(a[0, :20], disc & ~cup.astype(bool))
    np.testing.assert_array_equal(a[1, :20], cup)
    np.testing.assert_array_equal(b[0, :20], disc)
    np.testing.assert_array_equal(b[1, :20], cup)
    assert not a[:, 20:].any() and not b[:, 20:].any()  # 20 x 30 -> 10 padded rows
    assert read_manifest(tmp_path / "out" / "B").classes == ["disc", "cup"]


def test_tiff_images_8_and_16_bit_and_the_window_option(tmp_path):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    micrograph = rng.integers(200, 3800, (24, 32)).astype(np.uint16)  # 12-bit data in 16 bits
    (raw / "s" / "images").mkdir(parents=True)
    tifffile.imwrite(raw / "s" / "images" / "m.tif", micrograph)
    tifffile.imwrite(raw / "s" / "images" / "rgb.tiff", rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    mask = np.zeros((24, 32), np.uint8)
    mask[5:15, 5:20] = 255
    png(raw / "s" / "masks" / "m.png", mask)
    tifffile.imwrite(raw / "s" / "masks" / "rgb.tif", (mask > 0).astype(np.uint16))  # a 16-bit 0/1 mask
    with pytest.raises(DataError, match=r"images/m\.tif: image is uint16 \(16-bit or float\); expected an 8-bit grey or RGB "
                                        r"image \(pass --window to map each image's own 1st\.\.99th percentile to \[0, 1\]\)"):
        prepare("images", raw, tmp_path / "out", image_size=32, mask_size=32, summary=False)
    prepare("images", raw, tmp_path / "out", window=True, image_size=32, mask_size=32, summary=False)
    m = read_manifest(tmp_path / "out" / "s")
    assert m.settings["intensity"] == "per-image window 1..99 percentile -> [0, 1]"
    stored = read_png(tmp_path / "out" / "s" / "images" / "m.png")[:24, :, 0].astype(np.float32)
    lo, hi = np.percentile(micrograph.astype(np.float32), [1, 99])
    expected = np.clip((micrograph - lo) / (hi - lo), 0, 1) * 255
    assert np.abs(stored - expected).max() <= 1.0  # windowed, not divided by 65535 nor clamped to white
    both = unpack_mask(read_png(tmp_path / "out" / "s" / "masks" / "rgb.png"), 1)[0]
    np.testing.assert_array_equal(both[:24], mask > 0)


# ----------------------------------------------------------------------------------------------------
# refusals: one line each, naming the file


def test_every_unpaired_file_is_named_on_a_line_of_its_own(tmp_path, capsys):
    raw = make_raw_tile_sites(tmp_path / "raw", sites=2, tiles=2, odd=None)
    png(raw / "site2" / "images" / "lonely.png", textured(128, 128))
    png(raw / "site2" / "masks" / "orphan_mask.png", np.zeros((128, 128), np.uint8))
    out = tmp_path / "out"
    assert main(["prepare", "images", "--raw", str(raw), "--out", str(out), "--image-size", "64", "--mask-size", "32"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 2, err
    assert "site2/masks/orphan_mask.png: mask has no image with the same name" in err[0]
    assert "site2/images/lonely.png: image has no mask file with the same name; expected lonely.<ext>" in err[1]
    assert "[and 1 more unusable file(s) of site 'site2', listed above]" in err[1]
    assert (out / "site1").is_dir() and not (out / "site2").exists()  # site1 was complete before site2 failed
    # --skip-bad-cases leaves them out, listed in the manifest
    prepare("images", raw, out, skip_bad_cases=True, image_size=64, mask_size=32, summary=False)
    skipped = read_manifest(out / "site2").settings["source"]["skipped"]
    assert sorted(s["file"].rsplit("/", 1)[1] for s in skipped) == ["lonely.png", "orphan_mask.png"]


@pytest.mark.parametrize("mask, name, match", [
    (np.where(np.eye(20, 30) > 0, 255, 128), "a.png", r"masks/a\.png: mask values \[128, 255\]; expected 0/255 or 0/1 "
                                                      r"\(background / foreground\)"),
    (np.where(np.eye(20, 30) > 0, 3, 0), "a.png", r"masks/a\.png: mask values \[0, 3\]; expected 0/255 or 0/1"),
    (np.pad(np.full((10, 14), 255), ((5, 5), (8, 8))), "a.jpg",  # a 0/255 mask saved as JPEG: blurred values
     r"masks/a\.jpg: mask values \[0, .*\]; expected 0/255 or 0/1 \(background / foreground\) \(a lossy JPEG mask\?"),
])
def test_wrong_mask_values_are_refused(tmp_path, mask, name, match):
    raw = tmp_path / "raw"
    png(raw / "s" / "images" / "a.png", textured(20, 30))
    png(raw / "s" / "masks" / name, mask.astype(np.uint8))
    with pytest.raises(DataError, match=match):
        prepare("images", raw, tmp_path / "out", **SMALL, summary=False)
    assert not (tmp_path / "out" / "s").exists()


def test_index_values_beyond_the_classes_and_a_missing_class_file(tmp_path):
    raw = tmp_path / "raw"
    png(raw / "s" / "images" / "a.png", textured(20, 30))
    png(raw / "s" / "masks" / "a.png", np.where(np.eye(20, 30) > 0, 255, 0).astype(np.uint8))
    with pytest.raises(DataError, match=r"a\.png: mask values \[0, 255\]; expected index coding 0\.\.2 \(0 background, "
                                        r"1 disc, 2 cup\), or one file per class \(a_disc\.png, \.\.\.\)"):
        prepare("images", raw, tmp_path / "out", classes="disc,cup", **SMALL, summary=False)
    (raw / "s" / "masks" / "a.png").rename(raw / "s" / "masks" / "a_disc.png")
    with pytest.raises(DataError, match=r"images/a\.png: per-class mask files a_disc\.png lack class\(es\) cup; expected "
                                        r"a_cup\.<ext> in the masks folder"):
        prepare("images", raw, tmp_path / "out", classes="disc,cup", **SMALL, summary=False)


@pytest.mark.parametrize("image, match", [
    (np.zeros((20, 30), np.uint8), r"images/a\.png: image is constant \(every pixel is 0\)"),
    (np.where(np.eye(20, 30) > 0, 200, 10).astype(np.uint8), r"images/a\.png: image has only 2 distinct values \[10, 200\]"),
])
def test_constant_and_label_like_images_are_refused(tmp_path, image, match):
    raw = tmp_path / "raw"
    png(raw / "s" / "images" / "a.png", image)
    png(raw / "s" / "masks" / "a.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(DataError, match=match):
        prepare("images", raw, tmp_path / "out", **SMALL, summary=False)


def test_nan_float_tiff_size_mismatch_and_a_folder_that_is_no_site(tmp_path):
    raw = tmp_path / "raw"
    (raw / "s" / "images").mkdir(parents=True)
    image = np.random.default_rng(0).uniform(0, 1, (20, 30)).astype(np.float32)
    image[3, 4] = np.nan
    tifffile.imwrite(raw / "s" / "images" / "a.tif", image)
    png(raw / "s" / "masks" / "a.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(DataError, match=r"images/a\.tif: image has NaN/inf values"):
        prepare("images", raw, tmp_path / "out", window=True, **SMALL, summary=False)
    tifffile.imwrite(raw / "s" / "images" / "a.tif", np.nan_to_num(image))
    png(raw / "s" / "masks" / "a.png", np.zeros((10, 30), np.uint8))
    with pytest.raises(DataError, match=r"masks/a\.png: mask size \(10, 30\) differs from image a\.tif size \(20, 30\)"):
        prepare("images", raw, tmp_path / "out", window=True, **SMALL, summary=False)
    (raw / "notes").mkdir()
    with pytest.raises(DataError, match=r"raw/notes: subfolders are none; expected images/ and masks/ \(every folder of "
                                        r"--raw is a site; restrict them with --sites\)"):
        prepare("images", raw, tmp_path / "out", window=True, **SMALL, summary=False)


def test_option_mistakes_exit_2_in_one_line(tmp_path, capsys):
    raw = make_raw_tile_sites(tmp_path / "raw", sites=1, tiles=1, odd=None)
    base = ["prepare", "images", "--raw", str(raw), "--out", str(tmp_path / "out")]
    for extra, needle in ((["--mask-coding", "refuge"], "mask coding is 'refuge'; expected auto"),
                          (["--low-pct", "5"], "--low-pct/--high-pct set the per-image window of 2D images; pass --window too"),
                          (["--classes", "disc,disc"], "classes 'disc,disc': expected 1 to 8 distinct names"),
                          (["--target-labels", "4"], "--target-labels does not apply to dataset images"),
                          (["--mask-coding", "instances", "--classes", "a,b"], "mask coding instances makes one class")):
        with pytest.raises(SystemExit) as exc:
            main([*base, *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="unknown site 'site9' for dataset images; expected some of site1"):
        prepare("images", raw, tmp_path / "out", sites=["site9"], summary=False)


# ----------------------------------------------------------------------------------------------------
# volumes


def nii(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))


def test_volumes_two_sites_non_square_slices_per_class_labels_and_nnunet_names(tmp_path):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    liver = np.zeros((24, 32, 4), np.uint8)
    liver[4:20, 6:26, 1:3] = 1
    tumour = np.zeros_like(liver)
    tumour[8:12, 10:14, 2] = 1
    nii(raw / "A" / "images" / "case01.nii.gz", rng.uniform(0, 900, liver.shape).astype(np.float32))
    nii(raw / "A" / "labels" / "case01.nii.gz", liver + tumour)  # index-coded: 1 liver, 2 tumour
    nii(raw / "B" / "images" / "case07_0000.nii.gz", rng.uniform(0, 900, liver.shape).astype(np.float32))  # nnU-Net names
    nii(raw / "B" / "labels" / "case07_liver.nii.gz", liver)  # one file per class; tumour inside liver
    nii(raw / "B" / "labels" / "case07_tumour.nii.gz", tumour * 255)
    assert main(["prepare", "volumes", "--raw", str(raw), "--out", str(tmp_path / "out"), "--classes", "liver,tumour",
                 "--image-size", "64", "--mask-size", "32"]) == 0
    a, b = read_manifest(tmp_path / "out" / "A"), read_manifest(tmp_path / "out" / "B")
    assert a.dataset == "volumes" and a.classes == ["liver", "tumour"] and a.resize == "pad"
    assert [s.slice for s in a.samples] == [0, 1, 2, 3] and a.samples[0].size == [24, 32] and a.samples[0].pad == [16, 0]
    assert a.volumes == ["A_case01"] * 4 and b.volumes == ["B_case07_0000"] * 4
    slice2 = unpack_mask(read_png(tmp_path / "out" / "B" / "masks" / "case07_0000_0002.png"), 2)
    assert slice2[0, :24].sum() > slice2[1, :24].sum() > 0 and (slice2[0][slice2[1] > 0] == 1).all()  # overlapping classes
    assert not slice2[:, 24:].any()
    nii(raw / "A" / "labels" / "case01.nii.gz", (liver + tumour) * 3)
    with pytest.raises(DataError, match=r"labels/case01\.nii\.gz: mask values \[0, 3, 6\]; expected index coding 0\.\.2"):
        prepare("volumes", raw, tmp_path / "out2", classes="liver,tumour", sites=["A"], **SMALL, summary=False)
    nii(raw / "A" / "labels" / "case01.nii.gz", (liver + tumour)[:, :30])
    with pytest.raises(DataError, match=r"case01\.nii\.gz: segmentation shape \(24, 30, 4\) differs from image case01\.nii\.gz"):
        prepare("volumes", raw, tmp_path / "out2", classes="liver,tumour", sites=["A"], **SMALL, summary=False)


# ----------------------------------------------------------------------------------------------------
# geometry: SAM's own rules


def test_longest_side_and_postprocess_follow_segment_anything():
    from types import SimpleNamespace

    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    for h, w, side in ((96, 128, 1024), (333, 1000, 1024), (1000, 333, 256), (7, 5, 128), (2056, 2124, 1024), (64, 64, 32)):
        assert geometry.longest_side_shape(h, w, side) == ResizeLongestSide.get_preprocess_shape(h, w, side)
    logits = torch.randn(2, 3, 32, 32)
    stub = SimpleNamespace(image_encoder=SimpleNamespace(img_size=128))
    for original in ((96, 128), (200, 150), (50, 50)):
        input_size = geometry.content_shape(*original, 128)
        expected = Sam.postprocess_masks(stub, logits, input_size, original)
        torch.testing.assert_close(geometry.restore_logits(logits, original, 128), expected)


def test_fit_image_pads_bottom_and_right_with_zeros():
    image = torch.rand(3, 30, 40) * 0.5 + 0.25
    square = geometry.fit_image(image, 80)
    assert square.shape == (3, 80, 80) and (square[:, 60:] == 0).all() and (square[:, :60] > 0.2).all()
    tall = geometry.fit_image(torch.rand(3, 40, 30) + 0.1, 80)
    assert (tall[:, :, 60:] == 0).all() and (tall[:, :, :60] > 0).all()
    mask = torch.zeros(1, 30, 40)
    mask[0, 10:20, 10:20] = 1
    fitted = geometry.fit_mask(mask, 20)
    assert fitted.shape == (1, 20, 20) and fitted[0, 15:].sum() == 0 and fitted.sum() > 0


def test_a_disc_tile_generator_makes_round_discs():
    image, disc = disc_tile(np.random.default_rng(1), 96, 128)
    h, w = extent(disc)
    assert image.dtype == np.uint8 and abs(h - w) <= 1
