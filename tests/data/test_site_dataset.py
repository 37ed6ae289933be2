"""The prepared-site format: writer -> reader round trip, patient split, and errors that name the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedfms.data.site_dataset import (
    MANIFEST,
    SiteDataset,
    SiteWriter,
    pack_mask,
    patient_split,
    read_manifest,
    site_is_complete,
    unpack_mask,
)
from fedfms.errors import DataError


def two_class_sample(rng, size=32):
    """A grey image and overlapping disc/cup masks (the cup lies inside the disc, as in fundus images)."""
    image = rng.uniform(0, 1, (size, size)).astype(np.float32)
    mask = np.zeros((2, size, size), np.uint8)
    mask[0, 8:24, 8:24] = 1
    mask[1, 12:20, 12:20] = 1
    return image, mask


def write_site(path, n_volumes=3, slices=2, classes=("disc", "cup"), size=32, **kw):
    rng = np.random.default_rng(0)
    written = []
    with SiteWriter(path, "s1", "test", list(classes), image_size=size, mask_size=size, **kw) as w:
        for v in range(n_volumes):
            for s in range(slices):
                image, mask = two_class_sample(rng, size)
                mask = mask[: len(classes)]
                w.add(image, mask, f"case{v}", s)
                written.append((image, mask))
    return written


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_values_and_multiclass_bits(tmp_path):
    written = write_site(tmp_path / "site")
    ds = SiteDataset(tmp_path / "site")
    assert len(ds) == 6 and ds.num_classes == 2
    # volume ids carry the site (unique across sites by construction); file names keep the caller's ids
    assert ds.volumes == ["s1_case0", "s1_case0", "s1_case1", "s1_case1", "s1_case2", "s1_case2"]
    for i, (image, mask) in enumerate(written):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (2, 32, 32)
        # grey copied to 3 channels; 8-bit storage: within half a grey level
        for c in range(3):
            np.testing.assert_allclose(item["image"][c].numpy(), image, atol=0.5 / 255 + 1e-6)
        assert torch.equal(item["mask"], torch.from_numpy(mask.astype(np.float32)))
        assert item["volume"] == f"s1_case{i // 2}" and item["id"] == f"case{i // 2}_{i % 2:04d}"
    # the PNG stores bit 0 for disc and bit 1 for cup: a cup pixel is in both -> 3
    packed = np.asarray(Image.open(tmp_path / "site" / "masks" / "case0_0000.png"))
    assert packed[16, 16] == 3 and packed[9, 9] == 1 and packed[0, 0] == 0
    m = read_manifest(tmp_path / "site")
    assert m.counts == {"volumes": 3, "samples": 6, "positive_samples": 6, "positive_fraction": 1.0}
    assert [s.slice for s in m.samples] == [0, 1] * 3


def test_rgb_uint8_images_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with SiteWriter(tmp_path / "site", "s", "t", ["fg"], image_size=16, mask_size=16) as w:
        w.add(rgb, np.ones((16, 16), np.uint8), "v")
    item = SiteDataset(tmp_path / "site")[0]
    assert torch.equal((item["image"] * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(rgb))


def test_pack_unpack_is_lossless_for_overlapping_classes():
    rng = np.random.default_rng(0)
    mask = (rng.uniform(size=(8, 5, 5)) > 0.5).astype(np.float32)
    packed = pack_mask(mask)
    assert packed.dtype == np.uint8 and packed.max() <= 255
    np.testing.assert_array_equal(unpack_mask(packed, 8), mask)


def test_resize_on_read(tmp_path):
    write_site(tmp_path / "site", size=32)
    item = SiteDataset(tmp_path / "site", image_size=64, mask_size=16)[0]
    assert item["image"].shape == (3, 64, 64)
    assert item["mask"].shape == (2, 16, 16)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}  # nearest: labels are never blended
    # disc at 8:24 of 32 -> 4:12 of 16
    assert item["mask"][0, 4:12, 4:12].all() and item["mask"][0, :4].sum() == 0


def test_writer_resizes_to_the_site_sizes(tmp_path):
    with SiteWriter(tmp_path / "site", "s", "t", ["fg"], image_size=16, mask_size=8) as w:
        w.add(np.linspace(0, 1, 1600, dtype=np.float32).reshape(40, 40), np.ones((40, 40), np.uint8), "v")
    item = SiteDataset(tmp_path / "site")[0]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 8, 8)


# ---------------------------------------------------------------------------------------------- split


def test_patient_split_is_disjoint_seeded_and_nine_to_one():
    volumes = [f"p{v}" for v in range(20) for _ in range(3)]
    train, val = patient_split(volumes, 0.1, seed=0)
    assert sorted(train + val) == list(range(60))
    train_v, val_v = {volumes[i] for i in train}, {volumes[i] for i in val}
    assert not train_v & val_v
    assert len(val_v) == 2 and len(train_v) == 18  # 9:1 of volumes, not of slices
    assert patient_split(volumes, 0.1, seed=0) == (train, val)
    others = {frozenset(volumes[i] for i in patient_split(volumes, 0.1, seed=s)[1]) for s in range(1, 6)}
    assert len(others | {frozenset(val_v)}) > 1


def test_patient_split_small_sites():
    assert patient_split(["a", "a", "b"], 0.1, 0)[1] != []  # at least one val volume with 2+ volumes
    train, val = patient_split(["a", "a"], 0.1, 0)
    assert train == [0, 1] and val == []  # a single volume cannot be split
    with pytest.raises(DataError, match="val_fraction"):
        patient_split(["a"], 1.0)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_site_and_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="site folder does not exist"):
        SiteDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"manifest\.json: manifest is missing"):
        SiteDataset(tmp_path / "empty")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match=r"manifest\.json: is a file; expected a prepared site folder"):
        SiteDataset(tmp_path / "manifest.json")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("image_size", "big", r"field 'image_size' is 'big'; expected a positive integer"),
        ("mask_size", True, r"field 'mask_size' is True"),
        ("classes", [], r"field 'classes' is \[\]"),
        ("format", "other", r"field 'format' is 'other'; expected 'fedfms-site'"),
        ("version", 99, r"field 'version' is 99"),
        ("samples", [], r"field 'samples' is empty"),
    ],
)
def test_manifest_with_bad_field(tmp_path, field, value, match):
    write_site(tmp_path / "site")
    path = tmp_path / "site" / MANIFEST
    raw = json.loads(path.read_text())
    raw[field] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=match) as err:
        SiteDataset(tmp_path / "site")
    assert str(path) in str(err.value)


def test_manifest_with_bad_sample_and_bad_json(tmp_path):
    write_site(tmp_path / "site")
    path = tmp_path / "site" / MANIFEST
    raw = json.loads(path.read_text())
    del raw["samples"][1]["volume"]
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"field 'samples\[1\]\.volume' is None"):
        read_manifest(tmp_path / "site")
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(tmp_path / "site")


def test_missing_mask_file(tmp_path):
    write_site(tmp_path / "site")
    missing = tmp_path / "site" / "masks" / "case1_0001.png"
    missing.unlink()
    with pytest.raises(DataError, match="file is missing") as err:
        SiteDataset(tmp_path / "site")
    assert str(missing) in str(err.value)


def test_mask_png_with_wrong_shape(tmp_path):
    write_site(tmp_path / "site")
    path = tmp_path / "site" / "masks" / "case0_0000.png"
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(path)
    with pytest.raises(DataError, match=r"shape is \(16, 16\); expected \(32, 32\)") as err:
        SiteDataset(tmp_path / "site")[0]
    assert str(path) in str(err.value)


def test_label_value_beyond_the_class_count(tmp_path):
    write_site(tmp_path / "site", classes=("fg",))
    path = tmp_path / "site" / "masks" / "case0_0001.png"
    bad = np.zeros((32, 32), np.uint8)
    bad[0, 0] = 2  # bit 1 = a second class the manifest does not have
    Image.fromarray(bad, "L").save(path)
    with pytest.raises(DataError, match=r"label value 2 uses bits beyond the 1 class") as err:
        SiteDataset(tmp_path / "site")[1]
    assert str(path) in str(err.value)


def test_unreadable_png(tmp_path):
    write_site(tmp_path / "site")
    path = tmp_path / "site" / "images" / "case2_0000.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="unreadable image") as err:
        SiteDataset(tmp_path / "site")[4]
    assert str(path) in str(err.value)


def test_image_png_in_the_wrong_mode(tmp_path):
    write_site(tmp_path / "site")
    path = tmp_path / "site" / "images" / "case0_0000.png"
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(path)
    with pytest.raises(DataError, match="PNG mode is L; expected RGB"):
        SiteDataset(tmp_path / "site")[0]


def test_empty_site_writes_nothing(tmp_path):
    out = tmp_path / "site"
    with pytest.raises(DataError, match="has no usable cases") as err:
        with SiteWriter(out, "s", "t", ["fg"]):
            pass
    assert str(out) in str(err.value)
    assert not out.exists() and not (tmp_path / "site.partial").exists()


def test_existing_output_is_not_overwritten_without_overwrite(tmp_path):
    out = tmp_path / "site"
    write_site(out, n_volumes=2)
    with pytest.raises(DataError, match="already exists"):
        SiteWriter(out, "s", "t", ["fg"])
    assert len(read_manifest(out).samples) == 4
    write_site(out, n_volumes=1, overwrite=True)
    assert len(read_manifest(out).samples) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # no .partial / .replaced left behind


def test_failure_inside_with_leaves_nothing(tmp_path):
    out = tmp_path / "site"
    with pytest.raises(RuntimeError, match="boom"):
        with SiteWriter(out, "s", "t", ["fg"], image_size=16, mask_size=16) as w:
            w.add(np.eye(16, dtype=np.float32), np.zeros((16, 16), np.uint8), "v")
            assert (tmp_path / "site.partial").is_dir()  # work in progress lives beside the output
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert not site_is_complete(out)


def test_failure_with_overwrite_keeps_the_previous_output(tmp_path):
    out = tmp_path / "site"
    write_site(out, n_volumes=2)
    with pytest.raises(RuntimeError):
        with SiteWriter(out, "s", "t", ["fg"], overwrite=True):
            raise RuntimeError("interrupted")
    assert len(read_manifest(out).samples) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


@pytest.mark.parametrize(
    "mask, match",
    [
        (np.full((2, 8, 8), 2, np.uint8), "not binary"),
        (np.zeros((3, 8, 8), np.uint8), "3 channel"),
        (np.zeros((2, 4, 4), np.uint8), "differs from image shape"),
    ],
)
def test_writer_rejects_bad_masks(tmp_path, mask, match):
    with pytest.raises(DataError, match=match):
        with SiteWriter(tmp_path / "site", "s", "t", ["a", "b"], image_size=8, mask_size=8) as w:
            w.add(np.zeros((8, 8), np.float32), mask, "case7")
    assert not (tmp_path / "site").exists()


def test_duplicate_sample_id_is_refused(tmp_path):
    with pytest.raises(DataError, match="written twice"):
        with SiteWriter(tmp_path / "site", "s", "t", ["fg"], image_size=8, mask_size=8) as w:
            for _ in range(2):
                w.add(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8), "v", 0)


# ---------------------------------------------------------------------------------------------- intensities


def _texture(size=16, dtype=np.float32, top=1.0):
    return (np.linspace(0, top, size * size).reshape(size, size)).astype(dtype)


def test_writer_refuses_uint16_and_out_of_range_floats_instead_of_clamping(tmp_path):
    micrograph = np.random.default_rng(0).integers(100, 4096, (16, 16)).astype(np.uint16)  # 12-bit data in uint16
    for image, match in (
        (micrograph, r"sample 'P1': image is uint16 with values \[\d+, \d+\]; expected uint8, or float in \[0, 1\]"),
        (_texture(top=3.7), r"sample 'P1': float image values span \[0, 3\.7\]; expected \[0, 1\]"),
        (_texture() - 0.5, r"float image values span \[-0\.5, 0\.5\]"),
        (np.full((16, 16), np.nan, np.float32), "NaN/inf"),
        (np.ones((16, 16), bool), "dtype is bool"),
    ):
        with pytest.raises(DataError, match=match):
            with SiteWriter(tmp_path / "site", "h", "t", ["fg"], image_size=16, mask_size=16) as w:
                w.add(image, np.zeros((16, 16), np.uint8), "P1")
        assert list(tmp_path.iterdir()) == []


def test_float_rounding_above_one_is_accepted_and_window_rule_keeps_contrast(tmp_path):
    with SiteWriter(tmp_path / "a", "h", "t", ["fg"], image_size=16, mask_size=16) as w:
        w.add(_texture() * (1 + 1e-6), np.zeros((16, 16), np.uint8), "P1")  # float rounding, not data out of range
    micrograph = (np.linspace(100, 4000, 256).reshape(16, 16)).astype(np.uint16)
    with SiteWriter(tmp_path / "b", "h", "t", ["fg"], image_size=16, mask_size=16, intensity="window") as w:
        w.add(micrograph, np.zeros((16, 16), np.uint8), "P1")
    stored = np.asarray(Image.open(tmp_path / "b" / "images" / "P1.png"))[..., 0]
    assert stored.min() == 0 and stored.max() == 255
    assert (stored == 255).mean() < 0.05  # not "99 % white": the 1st..99th percentile window, documented
    assert read_manifest(tmp_path / "b").settings["writer_intensity"] == "window"
    with pytest.raises(DataError, match="intensity is 'clamp'"):
        SiteWriter(tmp_path / "c", "h", "t", ["fg"], intensity="clamp")


def test_constant_2d_image_is_refused_constant_slices_of_a_volume_are_not(tmp_path, capsys):
    with pytest.raises(DataError, match=r"sample 'tile0': image is constant \(every pixel is 0\)"):
        with SiteWriter(tmp_path / "site", "h", "t", ["fg"], image_size=8, mask_size=8) as w:
            w.add(np.zeros((8, 8), np.float32), np.ones((8, 8), np.uint8), "tile0")
    assert not (tmp_path / "site").exists()
    # the background slice above a body is constant and legitimate; a volume made only of such slices is flagged
    with SiteWriter(tmp_path / "site", "h", "t", ["fg"], image_size=8, mask_size=8) as w:
        w.add(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8), "body", 0)
        w.add(np.eye(8, dtype=np.float32), np.eye(8, dtype=np.uint8), "body", 1)
        w.add(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8), "blank", 0)
    err = capsys.readouterr().err
    assert "volume(s) h_blank is constant" in err and "h_body" not in err
    assert read_manifest(tmp_path / "site").counts["samples"] == 3


def test_volume_ids_carry_the_site_so_pooled_sites_never_share_one(tmp_path):
    for site in ("A", "B"):
        with SiteWriter(tmp_path / site, site, "t", ["fg"], image_size=8, mask_size=8) as w:
            w.add(np.eye(8, dtype=np.float32), np.eye(8, dtype=np.uint8), "tile0")
            w.add(np.eye(8, dtype=np.float32), np.eye(8, dtype=np.uint8), "A_kept", 0)  # already prefixed at A
    a, b = read_manifest(tmp_path / "A"), read_manifest(tmp_path / "B")
    assert a.volumes == ["A_tile0", "A_kept"] and b.volumes == ["B_tile0", "B_A_kept"]
    assert [s.id for s in a.samples] == ["tile0", "A_kept_0000"]  # file names keep the caller's ids
    assert set(a.volumes).isdisjoint(b.volumes)


# ---------------------------------------------------------------------------------------------- failures leave nothing


def test_bad_mask_leaves_no_folder_and_names_the_api_argument(tmp_path):
    out = tmp_path / "new" / "deeper" / "site"
    mask = np.where(np.eye(8) > 0, 255, 0).astype(np.uint8)
    with pytest.raises(DataError, match=r"mask values \[0, 255\] are not binary; "
                                        r"expected 0/1 per class \(a 0/255 mask: divide it by 255\)"):
        with SiteWriter(out, "h", "t", ["fg"], image_size=8, mask_size=8) as w:
            w.add(np.eye(8, dtype=np.float32), mask, "P1")
    assert list(tmp_path.iterdir()) == []  # not even the parent folders it made
    write_site(tmp_path / "site")
    with pytest.raises(DataError, match=r"output already exists; expected a new folder \(or overwrite=True to replace it\)") as err:
        SiteWriter(tmp_path / "site", "s", "t", ["fg"])
    assert "--overwrite" not in str(err.value)


def test_out_dir_that_is_a_file_is_left_alone(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(DataError, match=r"notes\.txt: a file is where the site folder goes"):
            SiteWriter(target, "s", "t", ["fg"], overwrite=overwrite)
    assert target.read_text() == "mine"


def test_disk_full_while_writing_keeps_nothing_and_keeps_the_previous_output(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "site"
    write_site(out, n_volumes=2)
    real_save = Image.Image.save
    calls = {"n": 0}

    def full(self, fp, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(DataError, match=r"site\.partial/(images|masks)/\S+\.png: could not write \(No space left on device\); "
                                        r"nothing of site 's1' was kept"):
        write_site(out, n_volumes=3, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]
    assert len(read_manifest(out).samples) == 4  # the previous output, untouched


def test_failed_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    from pathlib import Path

    out = tmp_path / "site"
    write_site(out, n_volumes=2)
    real_rename = Path.rename

    def rename(self, target):
        if self.name == "site.partial":
            raise OSError(13, "Permission denied", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(DataError, match=r"site: could not replace it \(Permission denied\); the previous output is unchanged"):
        write_site(out, n_volumes=1, overwrite=True)
    monkeypatch.undo()
    assert len(read_manifest(out).samples) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_unwritable_parent_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name.endswith(".partial"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(DataError, match=r"site\.partial: cannot create the site folder there \(Permission denied\); "
                                        r"expected a writable folder"):
        with SiteWriter(tmp_path / "x" / "site", "s", "t", ["fg"]):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_file_named_like_the_work_folder_is_left_alone(tmp_path):
    (tmp_path / "site.partial").write_text("someone's notes")
    with pytest.raises(DataError, match=r"site\.partial: a file is where the work-in-progress folder goes"):
        with SiteWriter(tmp_path / "site", "s", "t", ["fg"]):
            pass
    assert (tmp_path / "site.partial").read_text() == "someone's notes" and not (tmp_path / "site").exists()
