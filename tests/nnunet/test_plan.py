"""Federated planning: what a site's fingerprint holds, and that the plan made from the merged fingerprints is the
plan nnU-Net itself makes on the pooled cases (its own fingerprint extractor and ExperimentPlanner, run on an
nnU-Net raw dataset of the same cases in a child process)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from fedfms.data.synthetic import make_disc_site
from fedfms.nnunet.config import FingerprintError, PlanError
from fedfms.nnunet.fingerprint import FIELDS, fingerprint_problems, intensity_properties, merge_fingerprints, site_fingerprint
from fedfms.nnunet.plan import build_network, check_plan, make_plan, plan_digest, travel_spec
from fedfms.nnunet.sitedata import NnUNetSiteData
from nnunet_sites import make_bordered_site, make_two_class_site


def _fingerprints(dirs):
    return {d.name: site_fingerprint(NnUNetSiteData(d)) for d in dirs}


def test_a_site_fingerprint_is_only_the_agreed_counts(tmp_path):
    site = make_bordered_site(tmp_path / "a", num_volumes=2, slices_per_volume=3, seed=1)
    data = NnUNetSiteData(site)
    fp = site_fingerprint(data)
    assert tuple(fp) == FIELDS
    assert fp["num_cases"] == 6 and fp["grey"] is True and fp["classes"] == ["disc"]
    assert fp["cases_with_overlapping_classes"] == 0
    # shapes: counted rows, sorted, no case order; every case is 48 x 48 with a smaller non-zero crop
    assert sum(r[4] for r in fp["shapes"]) == 6 and fp["shapes"] == sorted(fp["shapes"])
    assert all(r[:2] == [48, 48] and r[2] <= 48 and r[3] <= 48 for r in fp["shapes"])
    assert any(r[2] < 48 or r[3] < 48 for r in fp["shapes"])
    # histograms: every foreground pixel counted once per channel (grey: the three are equal)
    hist = np.asarray(fp["foreground_histograms"])
    fg = sum(int((c.packed > 0).sum()) for c in data.cases)
    assert hist.shape == (3, 256) and (hist.sum(1) == fg).all() and (hist[0] == hist[1]).all()
    assert fingerprint_problems(fp) == []
    json.dumps(fp)  # plain JSON: what FLARE carries


@pytest.mark.parametrize("change,expected", [
    (lambda fp: fp.update(case_ids=["p1"]), "not part of the agreed fingerprint"),
    (lambda fp: fp.pop("shapes"), "missing"),
    (lambda fp: fp.update(num_cases=-3), "num_cases"),
    (lambda fp: fp["shapes"].append([48, 48, 60, 10, 1]), "shapes"),
    (lambda fp: fp.update(foreground_histograms=[[0] * 256]), "foreground_histograms"),
    (lambda fp: fp.update(grey="yes"), "grey"),
])
def test_a_fingerprint_with_anything_else_is_refused_by_the_merge(tmp_path, change, expected):
    fps = _fingerprints([make_disc_site(tmp_path / "s1", site="s1", num_volumes=2, slices_per_volume=2),
                         make_disc_site(tmp_path / "s2", site="s2", num_volumes=2, slices_per_volume=2, seed=1)])
    change(fps["s2"])
    with pytest.raises(FingerprintError, match=expected) as err:
        merge_fingerprints(fps)
    assert "site s2" in str(err.value) and "\n" not in str(err.value)


def test_sites_with_other_classes_cannot_share_a_plan(tmp_path):
    one = make_disc_site(tmp_path / "one", site="one", num_volumes=2, slices_per_volume=2)
    two = make_two_class_site(tmp_path / "two", site="two")
    with pytest.raises(FingerprintError, match=r"site two has classes \['disc', 'cup'\].*share one task"):
        merge_fingerprints(_fingerprints([one, two]))


def test_intensity_statistics_from_histograms_equal_numpy_on_the_pixels():
    rng = np.random.default_rng(0)
    pixels = rng.integers(20, 230, size=5001)
    props = intensity_properties(np.bincount(pixels, minlength=256))
    assert props["mean"] == pytest.approx(pixels.mean()) and props["std"] == pytest.approx(pixels.std())
    lo, med, hi = np.percentile(pixels, (0.5, 50, 99.5))
    assert (props["percentile_00_5"], props["median"], props["percentile_99_5"]) == pytest.approx((lo, med, hi))
    assert (props["min"], props["max"]) == (pixels.min(), pixels.max())


def test_the_plan_is_deterministic_and_its_digest_tells_plans_apart(tmp_path):
    dirs = [make_bordered_site(tmp_path / f"s{i}", site=f"s{i}", seed=i) for i in range(2)]
    merged = merge_fingerprints(_fingerprints(dirs))
    a, b = make_plan(merged), make_plan(json.loads(json.dumps(merged)))
    assert a == b and plan_digest(a) == plan_digest(b)
    assert plan_digest(make_plan(merged, {"base_num_features": 16})) != plan_digest(a)
    # what travels: every tensor of the network once (its decoder aliases the encoder's tensors)
    network, spec = build_network(a), travel_spec(a)
    assert set(spec) < set(network.state_dict()) and not any(k.startswith("decoder.encoder.") for k in spec)
    assert sum(np.prod(shape) for shape, _ in spec.values()) == sum(p.numel() for p in network.parameters())
    with pytest.raises(PlanError, match="format"):
        check_plan({**a, "format": "something else"})


def _nnunet_raw(root, dirs, classes, label_mode, name):
    """The same cases as an nnU-Net raw dataset (PNG, what nnU-Net's NaturalImage2DIO reads)."""
    from fedfms.nnunet.plan import dataset_json

    pooled = NnUNetSiteData(dirs)
    folder = root / "raw" / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i, case in enumerate(pooled.cases):
        image = case.image[0] if pooled.grey else case.image.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(image)).save(folder / "imagesTr" / f"case{i:04d}_0000.png")
        seg = pooled.label_map(i, label_mode)[0, 0].astype(np.uint8)
        Image.fromarray(seg).save(folder / "labelsTr" / f"case{i:04d}.png")
    ds = dataset_json(classes, label_mode, 1 if pooled.grey else 3, len(pooled), "zscore")
    (folder / "dataset.json").write_text(json.dumps(ds))


NNUNET_PLANS = textwrap.dedent("""
    import json, sys
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    out = {}
    for name in sys.argv[2:]:
        extractor = DatasetFingerprintExtractor(name, 1)
        # nnU-Net draws 10^8 foreground intensities (with replacement) whatever the dataset's size: a 400 MB array
        # and its percentiles, most of this process's time. 10^6 draws estimate the statistics compared below to
        # well within their tolerance.
        extractor.num_foreground_voxels_for_intensitystats = 1e6
        fingerprint = extractor.run()
        planner = ExperimentPlanner(name)
        plans = planner.plan_experiment()
        out[name] = {"plans": plans, "fingerprint": fingerprint, "attrs": {k: repr(v) for k, v in vars(planner).items()}}
    json.dump(out, open(sys.argv[1], "w"), default=str)
""")
KINDS = {"grey_cropped": "Dataset501_Grey", "rgb_regions": "Dataset502_Regions"}


@pytest.fixture(scope="module")
def pooled_plans(tmp_path_factory):
    """Both kinds of federation, planned by us from fingerprints and by nnU-Net on the pooled cases (one child
    process runs nnU-Net's fingerprint extractor and planner for both datasets)."""
    import os

    root = tmp_path_factory.mktemp("pooled")
    ours = {}
    for kind, name in KINDS.items():
        if kind == "grey_cropped":  # crops of varied size: the median crop share decides use_mask_for_norm
            dirs = [make_bordered_site(root / "s0", site="s0", num_volumes=3, seed=3),
                    make_bordered_site(root / "s1", site="s1", num_volumes=2, fill=(0.5, 1.0), seed=4)]
            classes, label_mode = ["disc"], "softmax"
        else:  # the optic cup inside the disc: overlapping classes, nnU-Net's regions
            dirs = [make_two_class_site(root / "f0", site="f0", seed=5), make_two_class_site(root / "f1", site="f1", seed=6)]
            classes, label_mode = ["disc", "cup"], "regions"
        ours[kind] = (make_plan(merge_fingerprints(_fingerprints(dirs))), classes, label_mode)
        _nnunet_raw(root, dirs, classes, label_mode, name)
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"), "nnUNet_results": str(root / "res")}
    out = root / "nnunet.json"
    subprocess.run([sys.executable, "-c", NNUNET_PLANS, str(out), *KINDS.values()], env={**os.environ, **env}, check=True,
                   capture_output=True, timeout=600)
    real = json.loads(out.read_text())
    return {kind: (*ours[kind], real[name]) for kind, name in KINDS.items()}


@pytest.mark.integration  # runs nnU-Net's own fingerprint extraction and planning in a child process (~1 min)
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_federated_plan_is_nnunets_own_plan_of_the_pooled_cases(pooled_plans, kind):
    plan, classes, label_mode, real = pooled_plans[kind]
    assert plan["label_mode"] == label_mode and plan["classes"] == classes
    ours, theirs = plan["plans"], real["plans"]
    # the whole 2D configuration: patch, batch, spacing, normalisation, mask for norm, architecture
    assert ours["configurations"]["2d"] == theirs["configurations"]["2d"]
    assert set(theirs["configurations"]) == {"2d"}
    for key in ("original_median_spacing_after_transp", "original_median_shape_after_transp", "transpose_forward",
                "transpose_backward", "image_reader_writer", "label_manager", "plans_name"):
        assert ours[key] == theirs[key], key
    if kind == "grey_cropped":
        assert ours["configurations"]["2d"]["use_mask_for_norm"] == [True]
    # nnU-Net samples foreground pixels for its intensity statistics; the federation counts all of them
    for c, props in theirs["foreground_intensity_properties_per_channel"].items():
        for stat, value in props.items():
            assert ours["foreground_intensity_properties_per_channel"][c][stat] == pytest.approx(value, abs=6), (c, stat)
    # our planner is nnU-Net's ExperimentPlanner with the same settings; only what comes from files differs
    from fedfms.nnunet.plan import _planner_class

    mine = _planner_class()({}, {}, 8, 32, 512)
    file_based = {"dataset_name", "raw_dataset_folder", "dataset_json", "dataset", "dataset_fingerprint", "plans"}
    assert {k: repr(v) for k, v in vars(mine).items() if k not in file_based} == \
           {k: v for k, v in real["attrs"].items() if k not in file_based}
