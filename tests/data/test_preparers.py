"""Dataset preparers: small fake raw trees in each public layout -> prepared site folders."""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedfms.data.preparers import fets, registry
from fedfms.data.preparers.registry import prepare
from fedfms.data.site_dataset import SiteDataset, patient_split, read_manifest, unpack_mask
from fedfms.errors import ConfigError, DataError

SMALL = dict(image_size=32, mask_size=16)
EXACT = dict(image_size=16, mask_size=16)  # same as the raw slices: no resizing, exact values


# ----------------------------------------------------------------------------------------------------
# helpers


def nii(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode).save(path)
    return path


def tissue(h=16, w=16, base=40):
    """A textured 8-bit RGB tile (constant images are refused as carrying no information)."""
    return (np.arange(h * w * 3).reshape(h, w, 3) % 97 + base).astype(np.uint8)


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def masks_of(site_dir, sample_id, num_classes=1):
    return unpack_mask(read_png(site_dir / "masks" / f"{sample_id}.png"), num_classes)


def assert_nothing_written(out, site):
    assert not (out / site).exists()
    assert not (out / f"{site}.partial").exists()


def prostate_case(site_dir, name, depth=5, seg_suffix="_segmentation", labels=((1, 1), (2, 1), (3, 2)), seed=0, affine=None,
                  seg_shape=None):
    """A 16x16xdepth T2 volume; ``labels`` = (slice, label value) painted as a 6x7 box."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 1000, size=(16, 16, depth)).astype(np.float32)
    seg = np.zeros(seg_shape or img.shape, np.uint8)
    for k, value in labels:
        seg[4:10, 5:12, k] = value
    nii(site_dir / f"{name}.nii.gz", img)
    nii(site_dir / f"{name}{seg_suffix}.nii.gz", seg, affine)
    return img, seg


@pytest.fixture
def prostate_raw(tmp_path):
    raw = tmp_path / "raw"
    vols = {}
    vols["BIDMC", "Case00"] = prostate_case(raw / "BIDMC", "Case00", depth=5, seed=1)
    vols["BIDMC", "Case01"] = prostate_case(raw / "BIDMC", "Case01", depth=4, seed=2, labels=((0, 1),))
    vols["HK", "Case38"] = prostate_case(raw / "HK", "Case38", depth=3, seg_suffix="_Segmentation", seed=3, labels=((1, 1), (2, 2)))
    return raw, vols


# ----------------------------------------------------------------------------------------------------
# prostate


def test_prostate_slices_windowing_and_labels(prostate_raw, tmp_path, capsys):
    raw, vols = prostate_raw
    out = tmp_path / "out"
    written = prepare("prostate", raw, out, sites=["BIDMC", "hk"], **EXACT)
    assert written == [out / "BIDMC", out / "HK"]

    m = read_manifest(out / "BIDMC")
    assert m.classes == ["prostate"] and m.dataset == "prostate"
    assert m.counts == {"volumes": 2, "samples": 9, "positive_samples": 4, "positive_fraction": round(4 / 9, 4)}
    assert sorted({s.volume for s in m.samples}) == ["BIDMC_Case00", "BIDMC_Case01"]
    assert [s.slice for s in m.samples if s.volume == "BIDMC_Case00"] == [0, 1, 2, 3, 4]
    assert m.settings["low_pct"] == 1.0 and m.settings["high_pct"] == 99.0
    assert read_manifest(out / "HK").counts["samples"] == 3  # '_Segmentation' spelling paired too

    img, seg = vols["BIDMC", "Case00"]
    lo, hi = np.percentile(img, [1, 99])
    expected = np.clip((img[:, :, 2] - lo) / (hi - lo), 0, 1) * 255
    got = read_png(out / "BIDMC" / "images" / "BIDMC_Case00_0002.png")
    assert got.shape == (16, 16, 3) and (got[..., 0] == got[..., 2]).all()  # grey copied to 3 channels
    assert np.abs(got[..., 0].astype(float) - expected).max() <= 1.0
    # the darkest voxel is below the 1st percentile -> clipped to 0; the brightest above the 99th -> 255
    for pick, value in ((np.argmin, 0), (np.argmax, 255)):
        r, c, k = np.unravel_index(pick(img), img.shape)
        assert read_png(out / "BIDMC" / "images" / f"BIDMC_Case00_{k:04d}.png")[r, c, 0] == value

    # label 1 and label 2 (zones) both become the single prostate class
    for k in (1, 3):
        assert (masks_of(out / "BIDMC", f"BIDMC_Case00_{k:04d}")[0] == (seg[:, :, k] > 0)).all()
    assert masks_of(out / "BIDMC", "BIDMC_Case00_0000").sum() == 0
    summary = capsys.readouterr().out
    assert "BIDMC" in summary and "HK" in summary and "total" in summary


def test_prostate_resizes_image_bilinear_and_mask_nearest(prostate_raw, tmp_path):
    raw, _ = prostate_raw
    out = tmp_path / "out"
    prepare("prostate", raw, out, sites=["BIDMC"], image_size=32, mask_size=8)
    ds = SiteDataset(out / "BIDMC")
    item = ds[1]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 8, 8)
    assert set(np.unique(item["mask"].numpy())) <= {0.0, 1.0}
    # box rows 4..9, cols 5..11 of 16 -> rows 2..4, cols 2..5 of 8 under nearest
    assert item["mask"][0].sum() > 0 and item["mask"][0, 0, 0] == 0


def test_prostate_volumes_are_split_by_patient(prostate_raw, tmp_path):
    raw, _ = prostate_raw
    for i in range(2, 6):
        prostate_case(raw / "BIDMC", f"Case{i:02d}", depth=3, seed=10 + i, labels=((1, 1),))
    out = tmp_path / "out"
    prepare("prostate", raw, out, sites=["BIDMC"], **SMALL)
    vols = read_manifest(out / "BIDMC").volumes
    train, val = patient_split(vols, val_fraction=0.3, seed=0)
    assert train and val and sorted(train + val) == list(range(len(vols)))
    assert {vols[i] for i in train}.isdisjoint({vols[i] for i in val})


def test_prostate_institution_folder_names(tmp_path):
    raw = tmp_path / "raw"
    prostate_case(raw / "ISBI_1.5", "Case00", depth=2, labels=((0, 1),))
    prostate_case(raw / "RUNMC", "Case00", depth=2, labels=((1, 2),))
    out = tmp_path / "out"
    written = prepare("prostate", raw, out, sites=["ISBI", "ISBI1.5"], **SMALL)
    assert [p.name for p in written] == ["ISBI", "ISBI1.5"]
    assert read_manifest(out / "ISBI1.5").site == "ISBI1.5"
    # both sites number from Case00; the volume ids must still differ (pooled training, per-volume Dice)
    assert set(read_manifest(out / "ISBI").volumes).isdisjoint(read_manifest(out / "ISBI1.5").volumes)


def test_prostate_wrong_layout_names_the_missing_site(tmp_path):
    raw = tmp_path / "raw"
    prostate_case(raw / "BIDMC", "Case00")
    (raw / "stuff").mkdir()
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"no folder for site HK .*found \['BIDMC', 'stuff'\]"):
        prepare("prostate", raw, out, **SMALL)  # default: all six sites
    assert not out.exists()  # layout is checked before anything is written


def test_prostate_unexpected_label_value_is_an_error(tmp_path):
    raw = tmp_path / "raw"
    prostate_case(raw / "BIDMC", "Case00")
    prostate_case(raw / "BIDMC", "Case01", labels=((1, 1), (2, 7)))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"Case01_segmentation\.nii\.gz: unexpected label values \[7\]"):
        prepare("prostate", raw, out, sites=["BIDMC"], **SMALL)
    assert_nothing_written(out, "BIDMC")


def _shape_mismatch(site):
    prostate_case(site, "Case01", seg_shape=(16, 16, 4))


def _affine_mismatch(site):
    a = np.diag([2.0, 2.0, 3.0, 1.0])
    prostate_case(site, "Case01", affine=a)


def _truncated(site):
    prostate_case(site, "Case01")
    p = site / "Case01.nii.gz"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _no_segmentation(site):
    prostate_case(site, "Case01")
    (site / "Case01_segmentation.nii.gz").unlink()


@pytest.mark.parametrize(
    "breaker, pattern",
    [
        (_shape_mismatch, r"Case01_segmentation\.nii\.gz: segmentation shape"),
        (_affine_mismatch, r"Case01_segmentation\.nii\.gz: segmentation affine differs"),
        (_truncated, r"Case01\.nii\.gz: (truncated|not a readable)"),
        (_no_segmentation, r"Case01\.nii\.gz: no segmentation"),
    ],
)
def test_prostate_bad_case_errors_or_is_skipped(tmp_path, capsys, breaker, pattern):
    raw, out = tmp_path / "raw", tmp_path / "out"
    prostate_case(raw / "BIDMC", "Case00", depth=5)
    breaker(raw / "BIDMC")
    with pytest.raises(DataError, match=pattern):
        prepare("prostate", raw, out, sites=["BIDMC"], **SMALL)
    assert_nothing_written(out, "BIDMC")

    prepare("prostate", raw, out, sites=["BIDMC"], skip_bad_cases=True, **SMALL)
    m = read_manifest(out / "BIDMC")
    assert m.counts["volumes"] == 1 and m.counts["samples"] == 5
    skipped = m.settings["source"]["skipped"]
    assert len(skipped) == 1 and "Case01" in skipped[0]["file"]
    assert "warning:" in capsys.readouterr().err


def test_prostate_site_without_usable_cases(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "UCL").mkdir(parents=True)
    (raw / "UCL" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match=r"UCL: site 'UCL' has no usable cases"):
        prepare("prostate", raw, out, sites=["UCL"], **SMALL)
    _truncated(raw / "UCL")
    with pytest.raises(DataError, match=r"no usable cases \(1 bad case"):
        prepare("prostate", raw, out, sites=["UCL"], skip_bad_cases=True, **SMALL)
    assert_nothing_written(out, "UCL")


def test_rerun_is_idempotent_and_never_overwrites_silently(prostate_raw, tmp_path, capsys):
    raw, _ = prostate_raw
    out = tmp_path / "out"
    prepare("prostate", raw, out, sites=["HK"], **SMALL)
    manifest = out / "HK" / "manifest.json"
    before = (manifest.stat().st_mtime_ns, manifest.read_text())
    capsys.readouterr()

    assert prepare("prostate", raw, out, sites=["HK"], **SMALL) == [out / "HK"]
    assert "already prepared" in capsys.readouterr().err
    assert (manifest.stat().st_mtime_ns, manifest.read_text()) == before

    with pytest.raises(DataError, match=r"HK: already prepared with different settings \(.*high_pct 99.0 -> 95.0"):
        prepare("prostate", raw, out, sites=["HK"], high_pct=95.0, **SMALL)
    with pytest.raises(DataError, match=r"image_size 32 -> 64"):
        prepare("prostate", raw, out, sites=["HK"], image_size=64, mask_size=16)
    assert manifest.read_text() == before[1]

    prepare("prostate", raw, out, sites=["HK"], high_pct=95.0, overwrite=True, **SMALL)
    assert read_manifest(out / "HK").settings["high_pct"] == 95.0
    assert not (out / "HK.partial").exists() and not (out / "HK.replaced").exists()


def test_foreign_folder_in_the_way_is_not_touched(prostate_raw, tmp_path):
    raw, _ = prostate_raw
    out = tmp_path / "out"
    (out / "HK").mkdir(parents=True)
    (out / "HK" / "precious.txt").write_text("mine")
    with pytest.raises(DataError, match=r"HK: output exists but is not a complete prepared site"):
        prepare("prostate", raw, out, sites=["HK"], **SMALL)
    assert (out / "HK" / "precious.txt").read_text() == "mine"


def test_leftover_partial_from_interrupted_run_is_replaced(prostate_raw, tmp_path):
    raw, _ = prostate_raw
    out = tmp_path / "out"
    (out / "HK.partial" / "images").mkdir(parents=True)
    (out / "HK.partial" / "images" / "junk.png").write_bytes(b"x")
    prepare("prostate", raw, out, sites=["HK"], **SMALL)
    assert not (out / "HK.partial").exists()
    assert len(list((out / "HK" / "images").iterdir())) == 3


def test_prostate_2p5d_and_empty_slice_option(prostate_raw, tmp_path):
    raw, vols = prostate_raw
    out = tmp_path / "out"
    prepare("prostate", raw, out, sites=["BIDMC"], empty_slices_keep=0, two_and_half_d=True, **EXACT)
    m = read_manifest(out / "BIDMC")
    assert m.counts["samples"] == m.counts["positive_samples"] == 4
    img, _ = vols["BIDMC", "Case00"]
    lo, hi = np.percentile(img, [1, 99])
    got = read_png(out / "BIDMC" / "images" / "BIDMC_Case00_0002.png").astype(float)
    for c, k in enumerate((1, 2, 3)):
        expected = np.clip((img[:, :, k] - lo) / (hi - lo), 0, 1) * 255
        assert np.abs(got[..., c] - expected).max() <= 1.0


# ----------------------------------------------------------------------------------------------------
# FeTS


def fets_subject(data_dir, sid, labels=((0, 1), (1, 2), (2, 4), (3, 4)), depth=6, seed=0, seg_dtype=np.uint8):
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 500, size=(16, 16, depth)).astype(np.float32)
    img[:2] = 0  # background outside the brain, as in the skull-stripped FeTS volumes
    seg = np.zeros(img.shape, seg_dtype)
    for k, value in labels:
        seg[3:9, 6:12, k] = value
    nii(data_dir / sid / f"{sid}_t1ce.nii.gz", img)
    nii(data_dir / sid / f"{sid}_flair.nii.gz", img * 2)  # other modalities exist and are ignored
    nii(data_dir / sid / f"{sid}_seg.nii.gz", seg)
    return img, seg


def write_csv(path, rows, header="Partition_ID,Subject_ID"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(f"{p},{s}\n" for p, s in rows))
    return path


@pytest.fixture
def fets_raw(tmp_path):
    raw = tmp_path / "raw"
    data = raw / fets.TRAINING_DIR
    vols = {
        "FeTS2022_00000": fets_subject(data, "FeTS2022_00000", seed=1),
        "FeTS2022_00001": fets_subject(data, "FeTS2022_00001", seed=2, labels=((4, 4),)),
        "FeTS2022_00100": fets_subject(data, "FeTS2022_00100", seed=3),
        "FeTS2022_00200": fets_subject(data, "FeTS2022_00200", seed=4),
    }
    rows = [(1, "FeTS2022_00000"), (1, "FeTS2022_00001"), (6, "FeTS2022_00100"), (2, "FeTS2022_00200")]
    write_csv(data / "partitioning_1.csv", rows)
    write_csv(data / "partitioning_2.csv", [(7, "FeTS2022_00200")])
    return raw, vols


def test_fets_clients_from_partition_csv_and_label_4_target(fets_raw, tmp_path):
    raw, vols = fets_raw
    out = tmp_path / "out"
    written = prepare("fets", raw, out, clients="1,6", **EXACT)
    assert [p.name for p in written] == ["client1", "client6"]
    assert not (out / "client2").exists()
    m1 = read_manifest(out / "client1")
    assert sorted(set(m1.volumes)) == ["client1_FeTS2022_00000", "client1_FeTS2022_00001"]  # <site>_<subject>
    assert m1.counts["samples"] == 12  # all 6 slices of both volumes by default
    assert m1.counts["positive_samples"] == 3  # label 4 on slices 2,3 and on slice 4
    assert m1.settings["partition_id"] == 1 and m1.settings["modality"] == "t1ce"
    _, seg = vols["FeTS2022_00000"]
    assert masks_of(out / "client1", "FeTS2022_00000_0000").sum() == 0  # label 1 (necrosis) -> 0
    assert masks_of(out / "client1", "FeTS2022_00000_0001").sum() == 0  # label 2 (oedema) -> 0
    assert (masks_of(out / "client1", "FeTS2022_00000_0002")[0] == (seg[:, :, 2] == 4)).all()
    assert read_manifest(out / "client6").volumes == ["client6_FeTS2022_00100"] * 6


def test_fets_empty_slices_and_2p5d(fets_raw, tmp_path):
    raw, vols = fets_raw
    out = tmp_path / "out"
    prepare("fets", raw, out, clients=[1], empty_slices_keep=0, **EXACT)
    m = read_manifest(out / "client1")
    assert [(s.id, s.slice) for s in m.samples] == [("FeTS2022_00000_0002", 2), ("FeTS2022_00000_0003", 3), ("FeTS2022_00001_0004", 4)]

    out2 = tmp_path / "out2"
    prepare("fets", raw, out2, clients=[1], empty_slices_keep="1", two_and_half_d=True, **EXACT)
    m2 = read_manifest(out2 / "client1")
    assert m2.counts["samples"] == 3 + 2  # one empty slice per volume on top of the tumour slices
    img, _ = vols["FeTS2022_00000"]
    lo, hi = np.percentile(img, [1, 99])
    got = read_png(out2 / "client1" / "images" / "FeTS2022_00000_0002.png").astype(float)
    for c, k in enumerate((1, 2, 3)):
        assert np.abs(got[..., c] - np.clip((img[:, :, k] - lo) / (hi - lo), 0, 1) * 255).max() <= 1.0

    out3 = tmp_path / "out3"
    prepare("fets", raw, out3, clients=[1], empty_slices_keep="0.5", **EXACT)
    # 4 and 5 empty slices -> round(2.0) + round(2.5) = 2 + 2
    assert read_manifest(out3 / "client1").counts["samples"] == 3 + 4


def test_fets_partitioning_2_and_raw_pointing_at_training_folder(fets_raw, tmp_path):
    raw, _ = fets_raw
    out = tmp_path / "out"
    prepare("fets", raw / fets.TRAINING_DIR, out, clients="7", partition_csv="partitioning_2.csv", **SMALL)
    assert read_manifest(out / "client7").volumes[0] == "client7_FeTS2022_00200"


def test_fets_missing_client_in_csv(fets_raw, tmp_path):
    raw, _ = fets_raw
    with pytest.raises(DataError, match=r"partitioning_1\.csv: partition\(s\) \[18, 21\] not found"):
        prepare("fets", raw, tmp_path / "out", **SMALL)  # default clients 1, 6, 18, 21
    assert not (tmp_path / "out").exists()


def test_fets_bad_csv_and_missing_csv(fets_raw, tmp_path):
    raw, _ = fets_raw
    data = raw / fets.TRAINING_DIR
    write_csv(data / "partitioning_1.csv", [(1, "x")], header="Partition,Subject")
    with pytest.raises(DataError, match=r"partitioning_1\.csv: columns are \['Partition', 'Subject'\]"):
        prepare("fets", raw, tmp_path / "out", clients="1", **SMALL)
    (data / "partitioning_1.csv").unlink()
    with pytest.raises(DataError, match=r"partitioning_1\.csv: partition CSV is missing"):
        prepare("fets", raw, tmp_path / "out", clients="1", **SMALL)


def test_fets_label_3_is_unexpected(fets_raw, tmp_path):
    raw, _ = fets_raw
    fets_subject(raw / fets.TRAINING_DIR, "FeTS2022_00100", labels=((2, 3),))
    with pytest.raises(DataError, match=r"FeTS2022_00100_seg\.nii\.gz: unexpected label values \[3\].*BraTS 2023"):
        prepare("fets", raw, tmp_path / "out", clients="6", **SMALL)
    assert_nothing_written(tmp_path / "out", "client6")


def test_fets_subject_missing_errors_or_is_skipped(fets_raw, tmp_path, capsys):
    raw, _ = fets_raw
    data = raw / fets.TRAINING_DIR
    write_csv(data / "partitioning_1.csv", [(1, "FeTS2022_00000"), (1, "FeTS2022_09999")])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"FeTS2022_09999: subject folder is missing"):
        prepare("fets", raw, out, clients="1", **SMALL)
    assert_nothing_written(out, "client1")
    prepare("fets", raw, out, clients="1", skip_bad_cases=True, **SMALL)
    assert read_manifest(out / "client1").counts["volumes"] == 1
    assert "FeTS2022_09999" in capsys.readouterr().err


def test_fets_wrong_layout(tmp_path):
    raw = tmp_path / "raw"
    (raw / "somewhere").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no MICCAI_FeTS2022_TrainingData/ folder"):
        prepare("fets", raw, tmp_path / "out", **SMALL)


# ----------------------------------------------------------------------------------------------------
# fundus


def fundus_case(site_dir, name, coding="refuge", size=(20, 24), ext=".jpg", mask_ext=".png"):
    h, w = size
    rng = np.random.default_rng(len(name))
    png(site_dir / "images" / f"{name}{ext}", rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))
    bg, rim, cup = (255, 128, 0) if coding == "refuge" else (0, 1, 2)
    mask = np.full((h, w), bg, np.uint8)
    mask[4:16, 6:18] = rim
    mask[8:12, 10:14] = cup
    png(site_dir / "masks" / f"{name}{mask_ext}", mask)
    return mask


def test_fundus_disc_includes_cup_by_default(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    fundus_case(raw / "REFUGE", "g0001", mask_ext=".bmp")
    fundus_case(raw / "REFUGE", "n0001")
    prepare("fundus", raw, out, sites=["REFUGE"], image_size=24, mask_size=24)
    m = read_manifest(out / "REFUGE")
    assert m.classes == ["disc", "cup"] and m.settings["disc_includes_cup"] is True
    assert m.counts["volumes"] == 2 and m.counts["samples"] == 2
    # non-square 20x24 images are resized to 24x24; compare on a 24x24 nearest-resized reference
    disc, cup = masks_of(out / "REFUGE", "g0001", 2)
    assert cup.sum() > 0 and disc.sum() > cup.sum()
    assert (disc[cup > 0] == 1).all()  # the disc channel covers the cup
    rows = np.flatnonzero(disc.any(axis=1))
    assert rows.min() > 0 and rows.max() < 23  # background border stays background

    out2 = tmp_path / "out2"
    prepare("fundus", raw, out2, sites=["REFUGE"], disc_includes_cup=False, image_size=24, mask_size=24)
    rim, cup2 = masks_of(out2 / "REFUGE", "g0001", 2)
    assert (cup2 == cup).all() and (rim[cup2 > 0] == 0).all() and rim.sum() == disc.sum() - cup.sum()


def test_fundus_exact_mapping_index_coding_and_patients_csv(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    site = raw / "G1020"
    mask = fundus_case(site, "image_0", coding="index", size=(16, 16), ext=".png")
    fundus_case(site, "image_1", coding="index", size=(16, 16), ext=".png")
    fundus_case(site, "image_2", coding="index", size=(16, 16), ext=".png")
    (site / "patients.csv").write_text("image,patient\nimage_0.jpg,P1\nimage_1.jpg,P1\nimage_2.jpg,P2\n")
    prepare("fundus", raw, out, sites=["G1020"], mask_coding="index", **EXACT)
    m = read_manifest(out / "G1020")
    assert [(s.id, s.volume) for s in m.samples] == [("image_0", "G1020_P1"), ("image_1", "G1020_P1"), ("image_2", "G1020_P2")]
    disc, cup = masks_of(out / "G1020", "image_0", 2)
    assert (disc == (mask > 0)).all() and (cup == (mask == 2)).all()
    train, val = patient_split(m.volumes, val_fraction=0.5)
    assert {m.volumes[i] for i in train}.isdisjoint({m.volumes[i] for i in val})


def test_fundus_site_without_usable_cases(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "ORIGA" / "images").mkdir(parents=True)
    (raw / "ORIGA" / "masks").mkdir()
    with pytest.raises(DataError, match=r"ORIGA: site 'ORIGA' has no usable cases"):
        prepare("fundus", raw, out, sites=["ORIGA"], **SMALL)
    assert_nothing_written(out, "ORIGA")


def test_fundus_drishti_folder_alias(tmp_path):
    raw = tmp_path / "raw"
    fundus_case(raw / "Drishti-GS", "drishtiGS_001")
    assert prepare("fundus", raw, tmp_path / "out", sites=["drishti-gs1"], **SMALL)[0].name == "Drishti-GS1"


def test_fundus_unreadable_and_truncated_png(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    fundus_case(raw / "ORIGA", "001")
    fundus_case(raw / "ORIGA", "002")
    (raw / "ORIGA" / "masks" / "002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"masks/002\.png: unreadable or truncated image"):
        prepare("fundus", raw, out, sites=["ORIGA"], **SMALL)
    assert_nothing_written(out, "ORIGA")
    fundus_case(raw / "ORIGA", "002", ext=".png")
    (raw / "ORIGA" / "images" / "002.jpg").unlink()
    data = (raw / "ORIGA" / "images" / "002.png").read_bytes()
    (raw / "ORIGA" / "images" / "002.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"images/002\.png: unreadable or truncated"):
        prepare("fundus", raw, out, sites=["ORIGA"], **SMALL)
    assert_nothing_written(out, "ORIGA")


def test_fundus_unexpected_values_and_wrong_coding(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    mask = fundus_case(raw / "REFUGE", "g0001")
    mask[0, 0] = 64
    png(raw / "REFUGE" / "masks" / "g0001.png", mask)
    with pytest.raises(DataError, match=r"g0001\.png: unexpected label values \[64\]"):
        prepare("fundus", raw, out, sites=["REFUGE"], **SMALL)
    fundus_case(raw / "REFUGE", "g0001", coding="index")
    with pytest.raises(DataError, match=r"g0001\.png: unexpected label values \[1, 2\].*--mask-coding index"):
        prepare("fundus", raw, out, sites=["REFUGE"], **SMALL)
    assert_nothing_written(out, "REFUGE")


def test_fundus_colour_mask_and_size_mismatch(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    fundus_case(raw / "REFUGE", "a")
    png(raw / "REFUGE" / "masks" / "a.png", np.full((20, 24), 255, np.uint8)[:10])
    with pytest.raises(DataError, match=r"a\.png: mask size \(10, 24\) differs from image a\.jpg size \(20, 24\)"):
        prepare("fundus", raw, out, sites=["REFUGE"], **SMALL)
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[..., 0] = 255
    png(raw / "REFUGE" / "masks" / "a.png", rgb)
    with pytest.raises(DataError, match=r"a\.png: colour mask"):
        prepare("fundus", raw, out, sites=["REFUGE"], **SMALL)


def test_fundus_wrong_layout_and_missing_mask(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    png(raw / "REFUGE" / "Training400" / "g0001.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"REFUGE: subfolders are \['Training400'\]; expected images/ and masks/"):
        prepare("fundus", raw, out, sites=["REFUGE"], **SMALL)

    fundus_case(raw / "ORIGA", "001")
    png(raw / "ORIGA" / "images" / "002.jpg", np.zeros((20, 24, 3), np.uint8))
    with pytest.raises(DataError, match=r"images/002\.jpg: image has no mask file"):
        prepare("fundus", raw, out, sites=["ORIGA"], **SMALL)
    prepare("fundus", raw, out, sites=["ORIGA"], skip_bad_cases=True, **SMALL)
    assert read_manifest(out / "ORIGA").counts["samples"] == 1
    assert "002.jpg" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# nuclei


def pannuke_fold(root, k, tissues, seed=0):
    rng = np.random.default_rng(seed)
    n = len(tissues)
    images = rng.uniform(0, 255, size=(n, 16, 16, 3))
    masks = np.zeros((n, 16, 16, 6))
    masks[..., 5] = 1
    for i in range(n):
        if i % 2 == 0:  # every other patch has two nuclei in different type channels
            masks[i, 2:5, 2:5, 0] = 3
            masks[i, 9:13, 8:12, 4] = 17
            masks[i, 2:5, 2:5, 5] = 0
            masks[i, 9:13, 8:12, 5] = 0
    base = root / "PanNuke" / f"Fold {k}"
    (base / "images" / f"fold{k}").mkdir(parents=True)
    (base / "masks" / f"fold{k}").mkdir(parents=True)
    np.save(base / "images" / f"fold{k}" / "images.npy", images)
    np.save(base / "images" / f"fold{k}" / "types.npy", np.array(tissues))
    np.save(base / "masks" / f"fold{k}" / "masks.npy", masks)
    return images, masks


def test_pannuke_tissues_become_sites_and_instances_binary(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    img1, masks1 = pannuke_fold(raw, 1, ["Adrenal_gland", "Breast", "Adrenal_gland", "Uterus"], seed=1)
    pannuke_fold(raw, 2, ["Uterus", "Adrenal_gland", "Colon"], seed=2)
    written = prepare("nuclei", raw, out, sites=["Adrenal_gland", "Uterus"], **EXACT)
    assert [p.name for p in written] == ["Adrenal_gland", "Uterus"]
    m = read_manifest(out / "Adrenal_gland")
    assert [s.id for s in m.samples] == ["fold1_00000", "fold1_00002", "fold2_00001"]
    assert m.counts["volumes"] == 3 and m.settings["pannuke_tissue"] == "Adrenal_gland"
    nuclei = masks_of(out / "Adrenal_gland", "fold1_00000")[0]
    assert (nuclei == (masks1[0, ..., :5] > 0).any(-1)).all() and nuclei.sum() == 9 + 16
    got = read_png(out / "Adrenal_gland" / "images" / "fold1_00000.png").astype(float)
    assert np.abs(got - img1[0]).max() <= 1.0
    assert read_manifest(out / "Uterus").counts["samples"] == 2


def test_pannuke_missing_tissue_and_bad_layout_and_truncated(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    pannuke_fold(raw, 1, ["Breast", "Colon"])
    with pytest.raises(DataError, match=r"no PanNuke patches of tissue 'Bile-duct'.*found tissues \['Breast', 'Colon'\]"):
        prepare("nuclei", raw, out, sites=["Bile-duct"], **SMALL)
    assert_nothing_written(out, "Bile-duct")

    pannuke_fold(raw, 2, ["Esophagus", "Esophagus"])
    masks = raw / "PanNuke" / "Fold 2" / "masks" / "fold2" / "masks.npy"
    data = masks.read_bytes()
    masks.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"fold2/masks\.npy: unreadable or truncated"):
        prepare("nuclei", raw, out, sites=["Esophagus"], **SMALL)
    assert_nothing_written(out, "Esophagus")

    (raw / "PanNuke" / "Fold 2" / "images" / "fold2" / "images.npy").unlink()
    with pytest.raises(DataError, match=r"Fold 2: found 0 images\.npy files"):
        prepare("nuclei", raw, out, sites=["Esophagus"], **SMALL)


def test_pannuke_negative_instance_ids(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _, masks = pannuke_fold(raw, 1, ["Uterus", "Uterus"])
    masks[1, 0, 0, 1] = -2
    np.save(raw / "PanNuke" / "Fold 1" / "masks" / "fold1" / "masks.npy", masks)
    with pytest.raises(DataError, match=r"masks\.npy: mask 1 has negative or non-integer values"):
        prepare("nuclei", raw, out, sites=["Uterus"], **SMALL)


def monuseg_xml(path, polygons):
    regions = "".join(
        "<Region><Vertices>" + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in poly) + "</Vertices></Region>"
        for poly in polygons
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<Annotations><Annotation><Regions>{regions}</Regions></Annotation></Annotations>")


def test_monuseg_native_xml_layout_and_tcga_patients(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    base = raw / "MoNuSeg" / "MoNuSeg 2018 Training Data"
    names = ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX2", "TCGA-18-5592-01Z-00-DX1"]
    for name in names:
        png(base / "Tissue Images" / f"{name}.tif", tissue(base=150))
        monuseg_xml(base / "Annotations" / f"{name}.xml", [[(2, 2), (7, 2), (7, 7), (2, 7)], [(10, 10), (11, 10)]])
    prepare("nuclei", raw, out, sites=["MoNuSeg"], **EXACT)
    m = read_manifest(out / "MoNuSeg")
    assert {s.id: s.volume for s in m.samples} == {
        names[0]: "MoNuSeg_TCGA-A7-A13E", names[1]: "MoNuSeg_TCGA-A7-A13E", names[2]: "MoNuSeg_TCGA-18-5592"
    }
    assert m.settings["source"]["patient_ids"] == {"TCGA barcode": 3}
    mask = masks_of(out / "MoNuSeg", names[0])[0]
    assert mask[4, 4] == 1 and mask[0, 0] == 0 and mask[10, 10] == 0  # 2-vertex region ignored
    assert 25 <= mask.sum() <= 36
    train, val = patient_split(m.volumes, val_fraction=0.5)
    assert {m.volumes[i] for i in train}.isdisjoint({m.volumes[i] for i in val})


def test_tnbc_native_layout(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for slide, n in (("01", 2), ("02", 1)):
        for j in range(1, n + 1):
            png(raw / "TNBC" / f"Slide_{slide}" / f"{slide}_{j}.png", tissue(base=90))
            gt = np.zeros((16, 16), np.uint8)
            gt[3:6, 3:6] = 255
            png(raw / "TNBC" / f"GT_{slide}" / f"{slide}_{j}.png", gt)
    prepare("nuclei", raw, out, sites=["TNBC"], **EXACT)
    m = read_manifest(out / "TNBC")
    assert [(s.id, s.volume) for s in m.samples] == [("01_1", "TNBC_01"), ("01_2", "TNBC_01"), ("02_1", "TNBC_02")]
    assert masks_of(out / "TNBC", "01_1")[0].sum() == 9


def test_monusac_normalised_layout_instances_npy_and_16bit(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    site = raw / "MoNuSAC"
    png(site / "images" / "TCGA-55-1594-01Z-00-DX1_1.png", tissue(base=50))
    png(site / "images" / "TCGA-55-1594-01Z-00-DX1_2.png", tissue(base=60))
    inst = np.zeros((16, 16), np.int32)
    inst[1:4, 1:4] = 1
    inst[8:10, 8:12] = 300  # instance ids beyond 255
    (site / "masks").mkdir()
    np.save(site / "masks" / "TCGA-55-1594-01Z-00-DX1_1.npy", inst)
    png(site / "masks" / "TCGA-55-1594-01Z-00-DX1_2.png", inst.astype(np.uint16))
    prepare("nuclei", raw, out, sites=["MoNuSAC"], **EXACT)
    m = read_manifest(out / "MoNuSAC")
    assert set(m.volumes) == {"MoNuSAC_TCGA-55-1594"}
    for s in m.samples:
        assert (masks_of(out / "MoNuSAC", s.id)[0] == (inst > 0)).all()


def test_nuclei_bad_masks_and_wrong_layout(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    site = raw / "MoNuSAC"
    png(site / "images" / "a.png", tissue())
    (site / "masks").mkdir()
    np.save(site / "masks" / "a.npy", -np.ones((16, 16), np.int32))
    with pytest.raises(DataError, match=r"a\.npy: unexpected label values \[-1\]"):
        prepare("nuclei", raw, out, sites=["MoNuSAC"], **SMALL)
    np.save(site / "masks" / "a.npy", np.full((16, 16), 0.5))
    with pytest.raises(DataError, match=r"a\.npy: mask has non-integer values"):
        prepare("nuclei", raw, out, sites=["MoNuSAC"], **SMALL)
    assert_nothing_written(out, "MoNuSAC")

    (raw / "TNBC" / "whatever").mkdir(parents=True)
    with pytest.raises(DataError, match=r"TNBC: subfolders are \['whatever'\]; expected images/ \+ masks/"):
        prepare("nuclei", raw, out, sites=["TNBC"], **SMALL)


# ----------------------------------------------------------------------------------------------------
# registry and CLI


def test_registry_rejects_unknown_dataset_option_and_site(prostate_raw, tmp_path):
    raw, _ = prostate_raw
    assert set(registry.PREPARERS) == {"images", "volumes", "prostate", "fets", "fundus", "nuclei", "mni-demo"}
    with pytest.raises(ConfigError, match="unknown dataset"):
        prepare("mnist", raw, tmp_path / "o")
    with pytest.raises(ConfigError, match="clients"):
        prepare("prostate", raw, tmp_path / "o", clients="1")
    with pytest.raises(ConfigError, match="unknown site 'XYZ'"):
        prepare("prostate", raw, tmp_path / "o", sites=["XYZ"])
    with pytest.raises(DataError, match="raw folder does not exist"):
        prepare("prostate", tmp_path / "nothing", tmp_path / "o")
    with pytest.raises(ConfigError, match="image_size"):
        prepare("prostate", raw, tmp_path / "o", image_size=0)


def cli(argv):
    from fedfms.cli.prepare import add_parsers as add_prepare_parser

    parser = argparse.ArgumentParser(prog="fedfms")
    add_prepare_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prepare_runs_and_prints_summary(prostate_raw, tmp_path, capsys):
    raw, _ = prostate_raw
    out = tmp_path / "out"
    code = cli(["prepare", "prostate", "--raw", str(raw), "--out", str(out), "--sites", "BIDMC,HK",
                "--image-size", "32", "--mask-size", "16", "--low-pct", "2", "--empty-slices-keep", "1"])
    assert code == 0
    text = capsys.readouterr().out
    assert "prostate: 2 site(s) ready" in text and "BIDMC" in text and "total" in text
    m = read_manifest(out / "BIDMC")
    assert m.settings["low_pct"] == 2.0 and m.settings["empty_slices_keep"] == 1
    assert m.counts["samples"] == 4 + 2  # positives (3 + 1) plus one empty slice per volume
    assert cli(["prepare", "prostate", "--raw", str(raw), "--out", str(out), "--sites", "BIDMC", "HK",
                "--image-size", "32", "--mask-size", "16", "--low-pct", "2", "--empty-slices-keep", "1"]) == 0
    assert "already prepared" in capsys.readouterr().err


def test_cli_fundus_and_fets_options(tmp_path, fets_raw):
    raw, _ = fets_raw
    out = tmp_path / "out"
    assert cli(["prepare", "fets", "--raw", str(raw), "--out", str(out), "--clients", "6",
                "--two-and-half-d", "--empty-slices-keep", "0", "--image-size", "16", "--mask-size", "16"]) == 0
    m = read_manifest(out / "client6")
    assert m.settings["two_and_half_d"] is True and m.counts["samples"] == 2

    fraw = tmp_path / "fraw"
    fundus_case(fraw / "REFUGE", "g1")
    assert cli(["prepare", "fundus", "--raw", str(fraw), "--out", str(out / "f"), "--sites", "REFUGE",
                "--disc-includes-cup", "false", "--image-size", "16", "--mask-size", "16"]) == 0
    assert read_manifest(out / "f" / "REFUGE").settings["disc_includes_cup"] is False


@pytest.mark.parametrize(
    "extra",
    [
        ["--clients", "1"],                       # fets-only option on prostate
        ["--disc-includes-cup", "false"],         # fundus-only option
        ["--low-pct", "99", "--high-pct", "1"],   # empty window
        ["--empty-slices-keep", "many"],
        ["--sites", "Nowhere"],
        ["--image-size", "0"],
    ],
)
def test_cli_option_misuse_exits_2(prostate_raw, tmp_path, extra, capsys):
    raw, _ = prostate_raw
    with pytest.raises(SystemExit) as exc:
        cli(["prepare", "prostate", "--raw", str(raw), "--out", str(tmp_path / "out"), *extra])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_data_error_propagates_for_main_cli(tmp_path):
    with pytest.raises(DataError, match="raw folder does not exist"):
        cli(["prepare", "nuclei", "--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------------------------------
# re-runs are exact: the manifest records what each case read


def _prostate_cmd(raw, out, **kw):
    return prepare("prostate", raw, out, sites=["BIDMC"], **SMALL, **kw)


def test_rerun_after_cases_added_removed_or_edited_says_what_changed(prostate_raw, tmp_path, capsys):
    raw, _ = prostate_raw
    out = tmp_path / "out"
    _prostate_cmd(raw, out)
    inputs = read_manifest(out / "BIDMC").settings["source"]["inputs"]
    assert inputs["cases"]["Case00"] == ["Case00.nii.gz", "Case00_segmentation.nii.gz"]
    assert set(inputs["files"]["Case00.nii.gz"]) == {"size", "mtime_ns", "sha256"}
    before = (out / "BIDMC" / "manifest.json").read_text()

    prostate_case(raw / "BIDMC", "Case02", depth=4, seed=9)
    with pytest.raises(DataError, match=r"BIDMC: raw inputs differ from the ones it was prepared from "
                                        r"\(.*BIDMC: 1 case\(s\) added \(Case02\)\); pass --overwrite"):
        _prostate_cmd(raw, out)
    for f in (raw / "BIDMC").glob("Case02*"):
        f.unlink()
    for f in (raw / "BIDMC").glob("Case01*"):
        f.unlink()
    with pytest.raises(DataError, match=r"1 case\(s\) removed \(Case01\)"):
        _prostate_cmd(raw, out)
    prostate_case(raw / "BIDMC", "Case01", depth=4, seed=77, labels=((0, 1),))  # same name and size, other voxels
    with pytest.raises(DataError, match=r"1 case\(s\) changed \(Case01\)"):
        _prostate_cmd(raw, out)
    assert (out / "BIDMC" / "manifest.json").read_text() == before  # refused, never half-updated

    # --overwrite semantics unchanged: it re-prepares, and the manifest then lists exactly what is there
    (raw / "BIDMC" / "Case01.nii.gz").unlink()
    (raw / "BIDMC" / "Case01_segmentation.nii.gz").unlink()
    _prostate_cmd(raw, out, overwrite=True)
    assert read_manifest(out / "BIDMC").volumes == ["BIDMC_Case00"] * 5
    capsys.readouterr()
    _prostate_cmd(raw, out)
    assert "already prepared" in capsys.readouterr().err


def test_rerun_from_a_copied_raw_folder_is_the_same_preparation_another_one_is_not(prostate_raw, tmp_path, capsys):
    import os
    import shutil

    raw, _ = prostate_raw
    out = tmp_path / "out"
    _prostate_cmd(raw, out)
    copy = tmp_path / "copy"
    shutil.copytree(raw, copy, copy_function=shutil.copyfile)  # new modification times, same bytes
    capsys.readouterr()
    _prostate_cmd(copy, out)
    err = capsys.readouterr().err
    assert "already prepared" in err and "are identical" in err
    seg = copy / "BIDMC" / "Case00_segmentation.nii.gz"
    os.utime(seg, ns=(1, 1))  # touched: time differs, content hash decides
    _prostate_cmd(copy, out)

    other = tmp_path / "other"
    prostate_case(other / "BIDMC", "Case00", depth=5, seed=50)
    prostate_case(other / "BIDMC", "Case01", depth=4, seed=51, labels=((0, 1),))
    with pytest.raises(DataError, match=r"raw inputs differ .*raw/BIDMC -> .*other/BIDMC: 2 case\(s\) changed \(Case00, Case01\)"):
        _prostate_cmd(other, out)


def test_rerun_notices_a_new_patients_csv(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    fundus_case(raw / "G1020", "image_0", coding="index")
    fundus_case(raw / "G1020", "image_1", coding="index")
    prepare("fundus", raw, out, sites=["G1020"], mask_coding="index", **SMALL)
    (raw / "G1020" / "patients.csv").write_text("image,patient\nimage_0.jpg,P1\nimage_1.jpg,P1\n")
    with pytest.raises(DataError, match=r"patients\.csv added"):
        prepare("fundus", raw, out, sites=["G1020"], mask_coding="index", **SMALL)


def test_manifest_without_an_input_record_is_not_taken_as_current(prostate_raw, tmp_path):
    import json

    raw, _ = prostate_raw
    out = tmp_path / "out"
    _prostate_cmd(raw, out)
    path = out / "BIDMC" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["settings"]["source"]["inputs"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"the manifest records no raw inputs"):
        _prostate_cmd(raw, out)


# ----------------------------------------------------------------------------------------------------
# intensity checks at the door


def test_constant_volume_is_refused_or_skipped_and_listed(prostate_raw, tmp_path, capsys):
    raw, _ = prostate_raw
    seg = np.zeros((16, 16, 3), np.uint8)
    seg[4:9, 4:9, 1] = 1  # a positive mask on an all-black volume: exactly what must not be written
    nii(raw / "BIDMC" / "Case09.nii.gz", np.zeros((16, 16, 3), np.float32))
    nii(raw / "BIDMC" / "Case09_segmentation.nii.gz", seg)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"Case09\.nii\.gz: volume is constant \(every voxel is 0\); "
                                        r"expected an image with contrast \(use --skip-bad-cases"):
        _prostate_cmd(raw, out)
    assert_nothing_written(out, "BIDMC")
    _prostate_cmd(raw, out, skip_bad_cases=True)
    m = read_manifest(out / "BIDMC")
    assert "BIDMC_Case09" not in m.volumes
    assert [s["file"].endswith("Case09.nii.gz") for s in m.settings["source"]["skipped"]] == [True]
    assert "volume is constant" in capsys.readouterr().err


def test_segmentation_stored_as_the_image_and_empty_window_are_refused(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    labels = np.zeros((16, 16, 3), np.int16)
    labels[4:9, 4:9, 1] = 1
    nii(raw / "BIDMC" / "Case00.nii.gz", labels)
    nii(raw / "BIDMC" / "Case00_segmentation.nii.gz", labels.astype(np.uint8))
    with pytest.raises(DataError, match=r"Case00\.nii\.gz: volume has only 2 distinct values \[0, 1\], like a mask or segmentation"):
        _prostate_cmd(raw, out)
    sparse = np.zeros((16, 16, 3), np.float32)
    sparse[0, 0, :] = [1.5, 2.25, 3.125]
    nii(raw / "BIDMC" / "Case00.nii.gz", sparse)
    with pytest.raises(DataError, match=r"Case00\.nii\.gz: intensity window is empty"):
        _prostate_cmd(raw, out)
    assert_nothing_written(out, "BIDMC")


def test_fundus_constant_photo_16bit_photo_and_mask_in_images_are_refused(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    fundus_case(raw / "REFUGE", "a", ext=".png")
    cases = [
        (np.zeros((20, 24, 3), np.uint8), r"images/a\.png: image is constant \(every pixel is 0\)"),
        (np.random.default_rng(0).integers(0, 4096, (20, 24)).astype(np.uint16),
         r"images/a\.png: image mode I;16 \(16-bit or float\); expected an 8-bit"),
        (np.where(np.eye(20, 24) > 0, 128, 255).astype(np.uint8),
         r"images/a\.png: image has only 2 distinct values \[128, 255\], like a mask"),
    ]
    for image, match in cases:
        png(raw / "REFUGE" / "images" / "a.png", image)
        with pytest.raises(DataError, match=match):
            prepare("fundus", raw, out, sites=["REFUGE"], **SMALL)
        assert_nothing_written(out, "REFUGE")


def test_pannuke_constant_patch_is_refused(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    images, masks = pannuke_fold(raw, 1, ["Uterus", "Uterus"])
    images[1] = 0.0
    np.save(raw / "PanNuke" / "Fold 1" / "images" / "fold1" / "images.npy", images)
    with pytest.raises(DataError, match=r"images\.npy \[patch 1\]: image is constant"):
        prepare("nuclei", raw, out, sites=["Uterus"], **SMALL)


# ----------------------------------------------------------------------------------------------------
# patients and volume ids


def test_nuclei_names_without_patient_rule_warn_and_ids_are_unique_across_sites(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for site in ("MoNuSAC", "MoNuSeg"):
        for k in range(2):
            png(raw / site / "images" / f"tile{k}.png", tissue(base=30 + k))
            gt = np.zeros((16, 16), np.uint8)
            gt[2:6, 2:6] = 1
            png(raw / site / "masks" / f"tile{k}.png", gt)
    prepare("nuclei", raw, out, sites=["MoNuSAC", "MoNuSeg"], **EXACT)
    err = capsys.readouterr().err
    assert "MoNuSAC: 2 of 2 image name(s) carry no TCGA barcode or TNBC slide number" in err and "patients.csv" in err
    a, b = read_manifest(out / "MoNuSAC"), read_manifest(out / "MoNuSeg")
    assert a.volumes == ["MoNuSAC_tile0", "MoNuSAC_tile1"] and set(a.volumes).isdisjoint(b.volumes)
    assert a.settings["source"]["patient_ids"] == {"own image": 2}

    (raw / "MoNuSAC" / "patients.csv").write_text("image,patient\ntile0.png,slide7\ntile1.png,slide7\n")
    prepare("nuclei", raw, tmp_path / "out2", sites=["MoNuSAC"], **EXACT)
    assert "carry no TCGA" not in capsys.readouterr().err
    m = read_manifest(tmp_path / "out2" / "MoNuSAC")
    assert m.volumes == ["MoNuSAC_slide7"] * 2 and m.settings["source"]["patient_ids"] == {"patients.csv": 2}


def test_fets_subject_listed_in_two_partitions_is_refused(fets_raw, tmp_path):
    raw, _ = fets_raw
    write_csv(raw / fets.TRAINING_DIR / "partitioning_1.csv", [(1, "FeTS2022_00000"), (6, "FeTS2022_00000")])
    with pytest.raises(DataError, match=r"partitioning_1\.csv: line 3 lists Subject_ID FeTS2022_00000 again \(line 2, partition 1\)"):
        prepare("fets", raw, tmp_path / "out", clients="1,6", **SMALL)


# ----------------------------------------------------------------------------------------------------
# output folder problems: one line, nothing half-written, nothing left empty


def test_out_that_is_a_file_and_out_below_a_file(prostate_raw, tmp_path):
    raw, _ = prostate_raw
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(DataError, match=r"notes\.txt: output is a file; expected a folder"):
        _prostate_cmd(raw, target)
    with pytest.raises(DataError, match=r"notes\.txt/sub.*\(Not a directory\)"):
        _prostate_cmd(raw, target / "sub")
    assert target.read_text() == "mine"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "BIDMC").write_text("a file where the site goes")
    with pytest.raises(DataError, match=r"out/BIDMC: a file is where the site folder goes"):
        _prostate_cmd(raw, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "BIDMC").read_text() == "a file where the site goes"


def test_failed_run_leaves_no_empty_output_folder(prostate_raw, tmp_path):
    raw, _ = prostate_raw
    prostate_case(raw / "BIDMC", "Case05", labels=((1, 7),))
    out = tmp_path / "new" / "out"
    with pytest.raises(DataError, match="unexpected label values"):
        _prostate_cmd(raw, out)
    assert not (tmp_path / "new").exists()


def test_disk_full_during_prepare_is_one_line_and_leaves_nothing(prostate_raw, tmp_path, monkeypatch):
    import errno

    raw, _ = prostate_raw
    real_save = Image.Image.save

    def full(self, fp, *a, **k):
        if "Case01" in str(fp):
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"BIDMC\.partial/images/BIDMC_Case01_0000\.png: could not write \(No space left on device\)"):
        _prostate_cmd(raw, out)
    assert not out.exists()


def test_later_site_failing_says_which_sites_are_complete(prostate_raw, tmp_path):
    raw, _ = prostate_raw
    prostate_case(raw / "HK", "Case40", labels=((1, 9),))
    with pytest.raises(DataError, match=r"Case40_segmentation\.nii\.gz: unexpected label values \[9\].*\[site\(s\) BIDMC are complete in"):
        prepare("prostate", raw, tmp_path / "out", sites=["BIDMC", "HK"], **SMALL)
    assert read_manifest(tmp_path / "out" / "BIDMC").counts["samples"] == 9
    assert_nothing_written(tmp_path / "out", "HK")


@pytest.mark.parametrize("case", ["out_is_file", "raw_missing", "rerun_changed"])
def test_main_cli_prints_one_error_line_and_exits_2(prostate_raw, tmp_path, capsys, case):
    from fedfms.cli import main

    raw, _ = prostate_raw
    out = tmp_path / "out"
    base = ["prepare", "prostate", "--sites", "BIDMC", "--image-size", "32", "--mask-size", "16"]
    if case == "out_is_file":
        out.write_text("x")
    elif case == "raw_missing":
        raw = tmp_path / "missing"
    else:
        assert main([*base, "--raw", str(raw), "--out", str(out)]) == 0
        prostate_case(raw / "BIDMC", "Case07")
    capsys.readouterr()
    assert main([*base, "--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
