"""``fedfms prepare --preset reference``: the paper code's preprocessing, on small raw trees in the documented layouts.

Each expected value below is derived from the rule the authors' code (LIU-YUXI/FedFMS) applies, written out
independently here, so a preparer that drifts from it fails."""

from __future__ import annotations

import argparse
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedfms.data import volumes as vol
from fedfms.data.preparers import fets, nuclei, presets
from fedfms.data.preparers.registry import prepare
from fedfms.data.site_dataset import read_manifest, unpack_mask
from fedfms.errors import ConfigError, DataError

EXACT = dict(image_size=16, mask_size=16)  # same as the raw slices: no resizing, exact values


def nii(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))


def png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def masks_of(site_dir, sample_id, num_classes=1):
    return unpack_mask(read_png(site_dir / "masks" / f"{sample_id}.png"), num_classes)


def cli(argv):
    from fedfms.cli.prepare import add_parsers as add_prepare_parser

    parser = argparse.ArgumentParser(prog="fedfms")
    add_prepare_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def paper_window(volume):
    """The paper code's window: the volume's minimum .. its 99th percentile -> [0, 255]."""
    lo, hi = volume.min(), np.quantile(volume, 0.99)
    return (np.minimum(volume, hi) - lo) / (hi - lo) * 255


def project_window(volume):
    lo, hi = np.percentile(volume, [1, 99])
    return np.clip((volume - lo) / (hi - lo), 0, 1) * 255


# ----------------------------------------------------------------------------------------------------
# FeTS


# slice -> label painted in a box; depth 12
FETS_LABELS = ((0, 4), (3, 1), (6, 4), (7, 2), (11, 4))


def fets_raw(tmp_path, depth=12, labels=FETS_LABELS, subjects=("FeTS2022_00000",)):
    raw = tmp_path / "raw"
    data = raw / fets.TRAINING_DIR
    vols = {}
    for n, sid in enumerate(subjects):
        rng = np.random.default_rng(n + 1)
        img = rng.uniform(100, 500, size=(16, 16, depth)).astype(np.float32)
        img[0, 0] = 0  # a little background, under 1 % of the voxels, so the minimum is below the 1st percentile
        seg = np.zeros(img.shape, np.uint8)
        for k, value in labels:
            seg[3:9, 6:12, k] = value
        nii(data / sid / f"{sid}_t1ce.nii.gz", img)
        nii(data / sid / f"{sid}_seg.nii.gz", seg)
        vols[sid] = img, seg
    (data / "partitioning_1.csv").write_text("Partition_ID,Subject_ID\n" + "".join(f"1,{s}\n" for s in subjects))
    return raw, vols


def paper_fets_slices(seg):
    """The paper code's FeTS loop, written out: slices 1 .. D-2; a slice without label 1 or 4 only when its
    index is a multiple of 5."""
    return [i for i in range(1, seg.shape[-1] - 1) if np.isin(seg[:, :, i], (1, 4)).any() or i % 5 == 0]


def test_fets_reference_preset_labels_slices_window_and_2p5d(tmp_path):
    raw, vols = fets_raw(tmp_path)
    img, seg = vols["FeTS2022_00000"]
    out = tmp_path / "out"
    prepare("fets", raw, out, clients="1", preset="reference", **EXACT)
    m = read_manifest(out / "client1")
    # slices 0 and 11 (label 4, but the ends) are skipped; 3 (necrosis) and 6 (enhancing) are the target;
    # of the empty slices 1..10 only 5 and 10 (multiples of 5) stay; 7 (oedema only) is empty
    assert [s.slice for s in m.samples] == paper_fets_slices(seg) == [3, 5, 6, 10]
    assert m.classes == ["tumour_core"]
    assert m.counts["positive_samples"] == 2
    assert {k: m.settings[k] for k in ("preset", "target_labels", "low_pct", "high_pct", "two_and_half_d",
                                        "empty_slices_keep", "skip_end_slices")} == {
        "preset": "reference", "target_labels": [1, 4], "low_pct": 0.0, "high_pct": 99.0, "two_and_half_d": True,
        "empty_slices_keep": "every:5", "skip_end_slices": True}
    assert m.settings["label_map"] == "seg in {1,4} -> tumour_core; 0/2 -> background"
    assert (masks_of(out / "client1", "FeTS2022_00000_0003")[0] == (seg[:, :, 3] == 1)).all()
    assert (masks_of(out / "client1", "FeTS2022_00000_0006")[0] == (seg[:, :, 6] == 4)).all()
    assert masks_of(out / "client1", "FeTS2022_00000_0005").sum() == 0

    # 2.5D: channels are slices k-1, k, k+1, windowed from the volume's minimum to its 99th percentile
    expected = paper_window(img)
    got = read_png(out / "client1" / "images" / "FeTS2022_00000_0003.png").astype(float)
    for c, k in enumerate((2, 3, 4)):
        assert np.abs(got[..., c] - expected[:, :, k]).max() <= 1.0
    # ... which is not the project's 1st-99th percentile window (the test would notice a wrong window)
    assert np.abs(got[..., 1] - project_window(img)[:, :, 3]).max() > 1.0


def test_fets_project_preset_is_unchanged_and_recorded(tmp_path):
    raw, vols = fets_raw(tmp_path)
    _, seg = vols["FeTS2022_00000"]
    out = tmp_path / "out"
    prepare("fets", raw, out, clients="1", **EXACT)
    m = read_manifest(out / "client1")
    assert [s.slice for s in m.samples] == list(range(12))
    assert m.classes == ["enhancing_tumour"] and m.counts["positive_samples"] == 3  # label 4 on 0, 6, 11
    assert masks_of(out / "client1", "FeTS2022_00000_0003").sum() == 0  # necrosis is background here
    assert {k: m.settings[k] for k in ("preset", "target_labels", "low_pct", "two_and_half_d", "empty_slices_keep",
                                        "skip_end_slices")} == {
        "preset": "project", "target_labels": [4], "low_pct": 1.0, "two_and_half_d": False,
        "empty_slices_keep": "all", "skip_end_slices": False}
    assert m.settings["label_map"] == "seg == 4 -> enhancing_tumour; 0/1/2 -> background"


@pytest.mark.parametrize("seed", range(6))
def test_every_fifth_rule_and_skipped_ends_match_the_paper_loop(seed):
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(1, 40))
    seg = np.zeros((2, 2, depth), np.uint8)
    for k in rng.choice(depth, size=min(depth, int(rng.integers(0, 8))), replace=False):
        seg[0, 0, k] = rng.choice([1, 2, 4])
    target = np.isin(seg, (1, 4)).any(axis=(0, 1))
    assert vol.select_slices(target, vol.parse_empty_keep("every:5"), skip_end_slices=True) == paper_fets_slices(seg)


def test_every_n_and_skip_end_slices_are_options_of_their_own(tmp_path):
    raw, vols = fets_raw(tmp_path)
    out = tmp_path / "out"
    prepare("fets", raw, out, clients="1", empty_slices_keep="every:4", **EXACT)
    # label 4 on 0, 6, 11; empty slices with index % 4 == 0: 0 (positive anyway), 4, 8
    assert [s.slice for s in read_manifest(out / "client1").samples] == [0, 4, 6, 8, 11]
    prepare("fets", raw, tmp_path / "out2", clients="1", skip_end_slices=True, target_labels="1,2,4", **EXACT)
    m = read_manifest(tmp_path / "out2" / "client1")
    assert [s.slice for s in m.samples] == list(range(1, 11)) and m.classes == ["whole_tumour"]
    assert m.settings["preset"] == "project"
    for bad in ("every:0", "every:x", "every:-2"):
        with pytest.raises(ConfigError, match="expected every:N with N a positive integer"):
            vol.parse_empty_keep(bad)


def test_fets_target_labels_are_checked():
    assert fets.parse_target_labels(None) == [4]
    assert fets.parse_target_labels("4,1") == fets.parse_target_labels([1, 4]) == fets.parse_target_labels("1+4") == [1, 4]
    for bad in ("3", "", "1,x", [True], "0,4"):
        with pytest.raises(ConfigError, match="expected a non-empty subset of 1 \\(necrosis\\)"):
            fets.parse_target_labels(bad)


# ----------------------------------------------------------------------------------------------------
# one switch: contradictions refused, re-runs exact


def test_option_contradicting_the_reference_preset_is_refused_before_anything_is_written(tmp_path):
    raw, _ = fets_raw(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"--two-and-half-d is false, but --preset reference sets it to true "
                                          r"\(the paper code feeds FeTS slices k-1, k, k\+1 as RGB\); drop the option"):
        prepare("fets", raw, out, clients="1", preset="reference", two_and_half_d=False, **EXACT)
    with pytest.raises(ConfigError, match=r"--low-pct is 1.0, but --preset reference sets it to 0.0"):
        prepare("fets", raw, out, clients="1", preset="reference", low_pct=1.0, **EXACT)
    with pytest.raises(ConfigError, match=r"--target-labels is 4, but --preset reference sets it to 1,4"):
        prepare("fets", raw, out, clients="1", preset="reference", target_labels="4", **EXACT)
    assert not out.exists()
    # the same value as the preset's is fine
    prepare("fets", raw, out, clients="1", preset="reference", two_and_half_d=True, empty_slices_keep="every:5", **EXACT)
    assert read_manifest(out / "client1").settings["preset"] == "reference"


def test_calling_a_preparer_with_the_reference_preset_but_project_values_is_refused(tmp_path):
    # the manifest's "reference" must always mean the paper code's values, also from Python
    raw, _ = fets_raw(tmp_path)
    with pytest.raises(ConfigError, match=r"--target-labels is 4, but --preset reference sets it to 1,4"):
        fets.prepare_fets(raw, tmp_path / "out", clients="1", preset="reference", **EXACT)
    with pytest.raises(ConfigError, match=r"preset is 'paper'; expected one of project, reference"):
        prepare("fets", raw, tmp_path / "out", clients="1", preset="paper", **EXACT)


def test_rerun_with_the_other_preset_refuses_without_overwrite(tmp_path, capsys):
    raw, _ = fets_raw(tmp_path)
    out = tmp_path / "out"
    prepare("fets", raw, out, clients="1", **EXACT)
    before = (out / "client1" / "manifest.json").read_text()
    with pytest.raises(DataError, match=r"client1: already prepared with different settings "
                                        r"\(.*preset 'project' -> 'reference'.*\); pass --overwrite"):
        prepare("fets", raw, out, clients="1", preset="reference", **EXACT)
    assert (out / "client1" / "manifest.json").read_text() == before  # the good output is untouched
    prepare("fets", raw, out, clients="1", preset="reference", overwrite=True, **EXACT)
    assert read_manifest(out / "client1").settings["preset"] == "reference"
    capsys.readouterr()
    prepare("fets", raw, out, clients="1", preset="reference", **EXACT)
    assert "already prepared" in capsys.readouterr().err
    # the project's options that happen to give the same slices are still another preparation
    with pytest.raises(DataError, match=r"preset 'reference' -> 'project'"):
        prepare("fets", raw, out, clients="1", target_labels="1,4", low_pct=0, two_and_half_d=True,
                empty_slices_keep="every:5", skip_end_slices=True, **EXACT)


def test_outputs_made_before_presets_existed_are_still_already_prepared(tmp_path, capsys):
    raw, _ = fets_raw(tmp_path)
    out = tmp_path / "out"
    prepare("fets", raw, out, clients="1", **EXACT)
    path = out / "client1" / "manifest.json"
    manifest = json.loads(path.read_text())
    settings = manifest["settings"]
    # what a manifest written before presets looked like
    for key in ("preset", "skip_end_slices", "target_labels"):
        del settings[key]
    settings["target_label"] = 4
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    prepare("fets", raw, out, clients="1", **EXACT)
    assert "already prepared" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"preset 'project' -> 'reference'"):
        prepare("fets", raw, out, clients="1", preset="reference", **EXACT)


def test_cli_preset_and_its_options(tmp_path, capsys):
    raw, _ = fets_raw(tmp_path)
    out = tmp_path / "out"
    base = ["prepare", "fets", "--raw", str(raw), "--out", str(out), "--clients", "1", "--image-size", "16", "--mask-size", "16"]
    for extra, message in (
        (["--preset", "reference", "--empty-slices-keep", "all"], "--empty-slices-keep is all, but --preset reference sets it to every:5"),
        (["--preset", "paper"], "invalid choice: 'paper'"),
        (["--target-labels", "3"], "expected a non-empty subset"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli(base + extra)
        assert exc.value.code == 2 and message in capsys.readouterr().err
        assert not out.exists()
    assert cli(base + ["--preset", "reference"]) == 0
    assert read_manifest(out / "client1").settings["preset"] == "reference"
    # an option of another dataset, and a preset for the demo (which has none), are misuse
    for argv in (["prepare", "prostate", "--raw", str(raw), "--out", str(tmp_path / "o"), "--monuseg-subset", "train"],
                 ["prepare", "mni-demo", "--raw", str(tmp_path / "demo"), "--out", str(tmp_path / "o"), "--preset", "reference"]):
        with pytest.raises(SystemExit) as exc:
            cli(argv)
        assert exc.value.code == 2 and "does not apply to dataset" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------------------------------
# prostate


def test_prostate_reference_window_is_min_to_99th_percentile_and_keeps_every_slice(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    rng = np.random.default_rng(3)
    img = rng.uniform(0, 1000, size=(16, 16, 5)).astype(np.float32)
    seg = np.zeros(img.shape, np.uint8)
    seg[4:10, 5:12, 2] = 1
    nii(raw / "BIDMC" / "Case00.nii.gz", img)
    nii(raw / "BIDMC" / "Case00_segmentation.nii.gz", seg)
    prepare("prostate", raw, out, sites=["BIDMC"], preset="reference", **EXACT)
    m = read_manifest(out / "BIDMC")
    assert [s.slice for s in m.samples] == [0, 1, 2, 3, 4]  # the ends too: only the FeTS code skips them
    assert m.settings["preset"] == "reference" and m.settings["low_pct"] == 0.0 and m.settings["high_pct"] == 99.0
    expected = paper_window(img)
    for k in range(5):
        got = read_png(out / "BIDMC" / "images" / f"BIDMC_Case00_{k:04d}.png")
        assert (got[..., 0] == got[..., 2]).all()  # 2D: grey copied to 3 channels
        assert np.abs(got[..., 0].astype(float) - expected[:, :, k]).max() <= 1.0
    r, c, k = np.unravel_index(np.argmin(img), img.shape)
    assert read_png(out / "BIDMC" / "images" / f"BIDMC_Case00_{k:04d}.png")[r, c, 0] == 0
    with pytest.raises(ConfigError, match=r"--two-and-half-d is true, but --preset reference sets it to false"):
        prepare("prostate", raw, tmp_path / "o2", sites=["BIDMC"], preset="reference", two_and_half_d=True, **EXACT)
    with pytest.raises(ConfigError, match=r"--skip-end-slices is true, but --preset reference sets it to false"):
        prepare("prostate", raw, tmp_path / "o2", sites=["BIDMC"], preset="reference", skip_end_slices=True, **EXACT)


# ----------------------------------------------------------------------------------------------------
# fundus


def test_fundus_reference_disc_is_the_rim(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    mask = np.full((16, 16), 255, np.uint8)  # REFUGE coding: 255 background, 128 rim, 0 cup
    mask[3:13, 3:13] = 128
    mask[6:10, 6:10] = 0
    png(raw / "REFUGE" / "images" / "g1.png", (np.arange(16 * 16 * 3).reshape(16, 16, 3) % 97 + 40).astype(np.uint8))
    png(raw / "REFUGE" / "masks" / "g1.png", mask)
    prepare("fundus", raw, out, sites=["REFUGE"], preset="reference", **EXACT)
    m = read_manifest(out / "REFUGE")
    disc, cup = masks_of(out / "REFUGE", "g1", 2)
    assert (disc == (mask == 128)).all() and (cup == (mask == 0)).all() and not (disc * cup).any()
    assert m.settings["preset"] == "reference" and m.settings["disc_includes_cup"] is False
    prepare("fundus", raw, tmp_path / "p", sites=["REFUGE"], **EXACT)
    disc_p, _ = masks_of(tmp_path / "p" / "REFUGE", "g1", 2)
    assert (disc_p == (mask != 255)).all()  # the project's disc includes the cup
    with pytest.raises(ConfigError, match=r"--disc-includes-cup is true, but --preset reference sets it to false"):
        prepare("fundus", raw, tmp_path / "o2", sites=["REFUGE"], preset="reference", disc_includes_cup=True, **EXACT)


# ----------------------------------------------------------------------------------------------------
# nuclei


def pannuke_fold(root, k, tissues):
    rng = np.random.default_rng(k)
    n = len(tissues)
    masks = np.zeros((n, 16, 16, 6))
    masks[:, 2:6, 2:6, 0] = 7
    base = root / "PanNuke" / f"Fold {k}"
    for sub, name, array in (("images", "images.npy", rng.uniform(0, 255, size=(n, 16, 16, 3))),
                             ("images", "types.npy", np.array(tissues)), ("masks", "masks.npy", masks)):
        (base / sub / f"fold{k}").mkdir(parents=True, exist_ok=True)
        np.save(base / sub / f"fold{k}" / name, array)


def monuseg_image(folder, name, xml_folder=None):
    png(folder / f"{name}.tif", (np.arange(16 * 16 * 3).reshape(16, 16, 3) % 89 + 60).astype(np.uint8))
    xml = (xml_folder or folder) / f"{name}.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.write_text('<Annotations><Annotation><Regions><Region><Vertices><Vertex X="2" Y="2"/><Vertex X="8" Y="2"/>'
                   '<Vertex X="8" Y="8"/></Vertices></Region></Regions></Annotation></Annotations>')


TRAIN_IMAGES = ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1"]
TEST_IMAGES = ["TCGA-2Z-A9J9-01A-01-TS1", "TCGA-ZF-A9R5-01A-01-TS1"]


def nuclei_raw(tmp_path):
    raw = tmp_path / "raw"
    tissues = ["Adrenal_gland", "Esophagus", "Bile-duct", "Uterus"]
    for k in (1, 2, 3):
        pannuke_fold(raw, k, tissues + ["Breast"])
    train = raw / "MoNuSeg" / "MoNuSeg 2018 Training Data"
    for name in TRAIN_IMAGES:
        monuseg_image(train / "Tissue Images", name, train / "Annotations")
    for name in TEST_IMAGES:
        monuseg_image(raw / "MoNuSeg" / "MoNuSegTestData", name)
    return raw


def test_nuclei_reference_folds_per_tissue_and_monuseg_training_set(tmp_path, capsys):
    raw, out = nuclei_raw(tmp_path), tmp_path / "out"
    sites = ["Adrenal_gland", "Esophagus", "Bile-duct", "Uterus", "MoNuSeg"]
    prepare("nuclei", raw, out, sites=sites, preset="reference", **EXACT)
    expected = {"Adrenal_gland": "fold2_00000", "Esophagus": "fold2_00001", "Bile-duct": "fold3_00002", "Uterus": "fold3_00003"}
    for tissue, sample in expected.items():
        m = read_manifest(out / tissue)
        assert [s.id for s in m.samples] == [sample]
        assert m.settings["pannuke_folds"] == [int(sample[4])] and m.settings["preset"] == "reference"
        # a change in a fold this tissue does not read is no change to it
        assert set(m.settings["source"]["inputs"]["extra"]) == {f"@fold {sample[4]} types.npy"}
    m = read_manifest(out / "MoNuSeg")
    assert sorted(s.id for s in m.samples) == sorted(TRAIN_IMAGES)
    assert m.settings["monuseg_subset"] == "train"
    assert m.settings["source"]["monuseg_test_images_left_out"] == sorted(TEST_IMAGES)
    assert "left out 2 image(s) of the MoNuSeg 2018 test set" in capsys.readouterr().err

    prepare("nuclei", raw, tmp_path / "p", sites=sites, **EXACT)
    assert [s.id for s in read_manifest(tmp_path / "p" / "Uterus").samples] == ["fold1_00003", "fold2_00003", "fold3_00003"]
    m = read_manifest(tmp_path / "p" / "MoNuSeg")
    assert len(m.samples) == 4
    assert read_manifest(tmp_path / "p" / "Uterus").settings["pannuke_folds"] == "all"
    assert read_manifest(tmp_path / "p" / "MoNuSeg").settings["monuseg_subset"] == "all"
    assert "pannuke_folds" not in read_manifest(tmp_path / "p" / "MoNuSeg").settings


def test_nuclei_reference_needs_the_folds_and_training_images_it_names(tmp_path):
    raw = nuclei_raw(tmp_path)
    import shutil

    shutil.rmtree(raw / "PanNuke" / "Fold 3")
    out = tmp_path / "out"
    prepare("nuclei", raw, out, sites=["Adrenal_gland"], preset="reference", **EXACT)  # fold 2 is enough for it
    with pytest.raises(DataError, match=r"PanNuke: no PanNuke fold 3 \(PanNuke folds for Uterus: 3\); found folds \[1, 2\]"):
        prepare("nuclei", raw, out, sites=["Uterus"], preset="reference", **EXACT)
    assert not (out / "Uterus").exists()

    shutil.rmtree(raw / "MoNuSeg" / "MoNuSeg 2018 Training Data")
    with pytest.raises(DataError, match=r"MoNuSeg: all 2 image\(s\) are in the MoNuSeg 2018 test set .*expected the training images"):
        prepare("nuclei", raw, out, sites=["MoNuSeg"], preset="reference", **EXACT)
    assert not (out / "MoNuSeg").exists()
    prepare("nuclei", raw, out, sites=["MoNuSeg"], **EXACT)  # the project uses them
    assert len(read_manifest(out / "MoNuSeg").samples) == 2


def test_pannuke_folds_spec():
    ref = {"Adrenal_gland": [2], "Esophagus": [2], "Bile-duct": [3], "Uterus": [3]}
    assert nuclei.parse_pannuke_folds("Adrenal_gland=2,Esophagus=2,Bile-duct=3,Uterus=3") == ref
    assert nuclei.parse_pannuke_folds("adrenal gland=2, ESOPHAGUS=2, bileduct=3, uterus=3") == ref
    assert nuclei.parse_pannuke_folds(ref) == ref == presets.REFERENCE_PANNUKE_FOLDS
    assert nuclei.parse_pannuke_folds(None) == nuclei.parse_pannuke_folds("all") == nuclei.parse_pannuke_folds("ALL") == "all"
    assert nuclei.parse_pannuke_folds("2+3") == {t: [2, 3] for t in nuclei.PANNUKE_TISSUES}
    assert nuclei.parse_pannuke_folds("Uterus=1,Uterus=3") == {"Adrenal_gland": "all", "Esophagus": "all",
                                                               "Bile-duct": "all", "Uterus": [1, 3]}
    for bad, match in (("Colon=2", "unknown tissue 'Colon'"), ("Uterus=x", "'x' is not a fold number"),
                       ("0", "'0' is not a fold number"), (3.5, "expected 'all', fold numbers")):
        with pytest.raises(ConfigError, match=match):
            nuclei.parse_pannuke_folds(bad)


def test_nuclei_cli_folds_option_and_preset_contradiction(tmp_path, capsys):
    raw = nuclei_raw(tmp_path)
    out = tmp_path / "out"
    base = ["prepare", "nuclei", "--raw", str(raw), "--out", str(out), "--sites", "Uterus", "--image-size", "16", "--mask-size", "16"]
    assert cli(base + ["--pannuke-folds", "Uterus=1+2"]) == 0
    assert [s.id for s in read_manifest(out / "Uterus").samples] == ["fold1_00003", "fold2_00003"]
    for extra, message in ((["--pannuke-folds", "Uterus=nine"], "is not a fold number"),
                           (["--preset", "reference", "--monuseg-subset", "all"],
                            "--monuseg-subset is all, but --preset reference sets it to train")):
        with pytest.raises(SystemExit) as exc:
            cli(base + extra)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_nuclei_outputs_made_before_presets_existed_are_still_already_prepared(tmp_path, capsys):
    raw, out = nuclei_raw(tmp_path), tmp_path / "out"
    prepare("nuclei", raw, out, sites=["Uterus", "MoNuSeg"], **EXACT)
    for site, keys in (("Uterus", ("preset", "pannuke_folds", "mask_resize")),
                       ("MoNuSeg", ("preset", "monuseg_subset", "mask_resize"))):
        path = out / site / "manifest.json"
        manifest = json.loads(path.read_text())
        for key in keys:
            del manifest["settings"][key]
        path.write_text(json.dumps(manifest))
    capsys.readouterr()
    prepare("nuclei", raw, out, sites=["Uterus", "MoNuSeg"], **EXACT)
    assert capsys.readouterr().err.count("already prepared") == 2
    with pytest.raises(DataError, match=r"Uterus: already prepared with different settings "
                                        r"\(resize 'pad' -> 'stretch'; mask_resize 'nearest-exact' -> 'nearest'; "
                                        r"pannuke_folds 'all' -> \[3\]; preset 'project' -> 'reference'\)"):
        prepare("nuclei", raw, out, sites=["Uterus"], preset="reference", **EXACT)


# ----------------------------------------------------------------------------------------------------
# mask resizing: OpenCV's INTER_NEAREST under the reference preset, nearest-exact under the project's


def opencv_nearest(src, n):
    """INTER_NEAREST, written out: output pixel i of n takes source pixel floor(i * m / n), m the source side."""
    rows = [i * src.shape[0] // n for i in range(n)]
    cols = [j * src.shape[1] // n for j in range(n)]
    return src[np.ix_(rows, cols)]


def nearest_centre(src, n):
    """The project's rule: the source pixel whose centre is nearest, floor((i + 0.5) * m / n)."""
    rows = [(2 * i + 1) * src.shape[0] // (2 * n) for i in range(n)]
    cols = [(2 * j + 1) * src.shape[1] // (2 * n) for j in range(n)]
    return src[np.ix_(rows, cols)]


@pytest.mark.parametrize("shape, size", [((7, 5), 4), ((5, 7), 9), ((13, 11), 6), ((31, 23), 256)])
def test_mask_resize_rules_pick_the_pixels_their_formulas_name(shape, size):
    import torch

    from fedfms.data.site_dataset import resize_mask

    labels = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape)  # every pixel tells where it came from
    mask = torch.from_numpy(labels)[None]
    got_opencv = resize_mask(mask, size, "nearest")[0].numpy()
    got_project = resize_mask(mask, size)[0].numpy()
    assert (got_opencv == opencv_nearest(labels, size)).all()
    assert (got_project == nearest_centre(labels, size)).all()
    assert (got_opencv != got_project).any()  # the two rules differ on these sizes, so each check above bites
    if shape == (7, 5):  # spelled out once: rows 0, 1, 3, 5 and columns 0, 1, 2, 3 of the 7x5 source
        assert got_opencv.tolist() == [[5 * r + c for c in (0, 1, 2, 3)] for r in (0, 1, 3, 5)]
    with pytest.raises(ValueError, match="mask resize rule is 'bilinear'"):
        resize_mask(mask, size, "bilinear")


def prostate_raw_odd(tmp_path):
    """One prostate case whose 15x13 slices hold a ragged blob (odd sides, so the two rules pick other pixels)."""
    raw = tmp_path / "raw"
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 1000, size=(15, 13, 3)).astype(np.float32)
    seg = (rng.uniform(size=img.shape) > 0.55).astype(np.uint8)
    nii(raw / "BIDMC" / "Case00.nii.gz", img)
    nii(raw / "BIDMC" / "Case00_segmentation.nii.gz", seg)
    return raw, seg


def test_reference_preset_resizes_masks_like_opencv_inter_nearest(tmp_path):
    raw, seg = prostate_raw_odd(tmp_path)
    sizes = dict(image_size=16, mask_size=6)
    prepare("prostate", raw, tmp_path / "ref", sites=["BIDMC"], preset="reference", **sizes)
    # the project preset stretched too, so that the two differ only by the mask rule
    prepare("prostate", raw, tmp_path / "proj", sites=["BIDMC"], resize="stretch", **sizes)
    differ = 0
    for k in range(seg.shape[-1]):
        ref = masks_of(tmp_path / "ref" / "BIDMC", f"BIDMC_Case00_{k:04d}")[0]
        proj = masks_of(tmp_path / "proj" / "BIDMC", f"BIDMC_Case00_{k:04d}")[0]
        assert (ref == opencv_nearest(seg[:, :, k], 6)).all()
        assert (proj == nearest_centre(seg[:, :, k], 6)).all()
        differ += int((ref != proj).sum())
    assert differ > 0
    assert read_manifest(tmp_path / "ref" / "BIDMC").settings["mask_resize"] == "nearest"
    assert read_manifest(tmp_path / "proj" / "BIDMC").settings["mask_resize"] == "nearest-exact"
    # the rule is an option of its own under the project preset, and the reference preset pins it
    prepare("prostate", raw, tmp_path / "mix", sites=["BIDMC"], mask_resize="nearest", resize="stretch", **sizes)
    assert (masks_of(tmp_path / "mix" / "BIDMC", "BIDMC_Case00_0001") == masks_of(tmp_path / "ref" / "BIDMC", "BIDMC_Case00_0001")).all()
    with pytest.raises(ConfigError, match=r"--mask-resize is nearest-exact, but --preset reference sets it to nearest "
                                          r"\(the paper code resizes masks with OpenCV's INTER_NEAREST"):
        prepare("prostate", raw, tmp_path / "o2", sites=["BIDMC"], preset="reference", mask_resize="nearest-exact", **sizes)
    with pytest.raises(ConfigError, match=r"mask_resize is 'area'; expected one of nearest-exact, nearest"):
        prepare("prostate", raw, tmp_path / "o2", sites=["BIDMC"], mask_resize="area", **sizes)
    assert not (tmp_path / "o2").exists()
    for dataset in ("prostate", "fets", "fundus", "nuclei"):
        assert presets.preset_options(dataset, "reference")["mask_resize"] == "nearest"


def test_outputs_made_before_the_mask_rule_was_recorded(tmp_path, capsys):
    raw, _ = prostate_raw_odd(tmp_path)
    out, sizes = tmp_path / "out", dict(image_size=16, mask_size=6)
    for preset in ("project", "reference"):
        prepare("prostate", raw, out / preset, sites=["BIDMC"], preset=preset, **sizes)
        path = out / preset / "BIDMC" / "manifest.json"
        manifest = json.loads(path.read_text())
        del manifest["settings"]["mask_resize"]  # as written before the rule was an option: nearest-exact then
        path.write_text(json.dumps(manifest))
    capsys.readouterr()
    prepare("prostate", raw, out / "project", sites=["BIDMC"], **sizes)
    assert "already prepared" in capsys.readouterr().err
    # an old reference output was resized with nearest-exact: it is not what the reference preset makes today
    with pytest.raises(DataError, match=r"already prepared with different settings \(mask_resize 'nearest-exact' -> "
                                        r"'nearest'\); pass --overwrite"):
        prepare("prostate", raw, out / "reference", sites=["BIDMC"], preset="reference", **sizes)


def test_cli_mask_resize(tmp_path, capsys):
    raw, seg = prostate_raw_odd(tmp_path)
    base = ["prepare", "prostate", "--raw", str(raw), "--sites", "BIDMC", "--image-size", "16", "--mask-size", "6"]
    assert cli(base + ["--out", str(tmp_path / "a"), "--mask-resize", "nearest", "--resize", "stretch"]) == 0
    assert (masks_of(tmp_path / "a" / "BIDMC", "BIDMC_Case00_0002")[0] == opencv_nearest(seg[:, :, 2], 6)).all()
    with pytest.raises(SystemExit) as exc:
        cli(base + ["--out", str(tmp_path / "b"), "--preset", "reference", "--mask-resize", "nearest-exact"])
    assert exc.value.code == 2 and "--mask-resize is nearest-exact, but --preset reference sets it to nearest" in capsys.readouterr().err


def test_mask_rule_applies_to_the_content_when_the_aspect_ratio_is_kept():
    import torch

    from fedfms.data.geometry import content_shape, fit_mask

    labels = np.arange(15 * 13, dtype=np.float32).reshape(15, 13)
    h, w = content_shape(15, 13, 6)
    for rule in ("nearest", "nearest-exact"):
        got = fit_mask(torch.from_numpy(labels)[None], 6, "pad", rule)[0].numpy()
        rows = [i * 15 // h for i in range(h)] if rule == "nearest" else [(2 * i + 1) * 15 // (2 * h) for i in range(h)]
        cols = [j * 13 // w for j in range(w)] if rule == "nearest" else [(2 * j + 1) * 13 // (2 * w) for j in range(w)]
        assert (got[:h, :w] == labels[np.ix_(rows, cols)]).all(), rule
        assert (got[h:, :] == 0).all() and (got[:, w:] == 0).all()
