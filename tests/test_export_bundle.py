"""``fedfms export bundle``: MONAI's own bundle runner on the exported bundle writes the masks ``fedfms predict`` writes,
pixel for pixel; the bundle carries only the trained tensors (never SAM's frozen encoder) and refuses an encoder other
than the one the federation trained on.

The demo's FedMSA run (a session fixture, ~1-2 min) is exported once per module; the -PT and FedSAM cases use a run
folder made here from a tiny model (no FLARE, seconds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedfms.bundle import MODEL_FILE, export_bundle
from fedfms.errors import CheckpointError, ConfigError, DataError
from fedfms.evaluation.baselines import site_split
from fedfms.models import ModelConfig, build_model, is_travel_key, travel_keys, travel_state_dict
from fedfms.training.predict import predict_cases
from fedfms.training.pretrain import DEMO_CHECKPOINT
from fedfms.training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    # the bundle's _target_s import this checkout's fedfms in MONAI's process
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "custom"), os.environ.get("PYTHONPATH")]))}


def monai_run(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file configs/inference.json ARGS`` from the bundle's folder."""
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", *args],
                          cwd=bundle, env=_env(), capture_output=True, text=True, timeout=600)


def in_process_run(bundle: Path, **override) -> None:
    """MONAI's runner in this process (``monai.bundle.run``), the bundle's ids overridden as on its command line. MONAI
    wraps an error of a component in its own RuntimeError; the bundle's own error (the cause) is raised."""
    from monai.bundle import run

    try:
        run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), logging_file=False, **override)
    except RuntimeError as exc:
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise cause from None


def fedfms_predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfms.cli", "predict", *args], env=_env(), capture_output=True,
                          text=True, timeout=600)


def read_mask(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if path.name.endswith(".nii.gz"):
        img = nib.load(str(path))
        return np.asarray(img.dataobj), img.affine
    return np.asarray(Image.open(path)), None


def assert_same_masks(a: Path, b: Path) -> int:
    """Every mask file in ``a`` has a twin in ``b`` with the same pixels (and, for volumes, geometry); returns how
    many foreground pixels there are (a test on empty masks would prove nothing)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and names
    foreground = 0
    for name in names:
        (x, ax), (y, ay) = read_mask(a / name), read_mask(b / name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
        if ax is not None:
            assert np.array_equal(ax, ay), name
        foreground += int((x > 0).sum())
    return foreground


# ----------------------------------------------------------------------------------------------------------------
# the demo's FedMSA run


@pytest.fixture(scope="module")
def demo_bundle(demo_fedmsa_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "fedmsa"
    export_bundle(demo_fedmsa_run["workspace"], out, data_root=demo_fedmsa_run["sites"])
    return out


def validation_inputs(demo: dict, folder: Path) -> Path:
    """Two validation slices of the scarce site (images) and one of its scans (a NIfTI volume)."""
    folder.mkdir()
    train = TrainConfig.from_dict({"val_fraction": 0.34, "split_seed": 0})
    dataset, _, val = site_split(demo["sites"] / "site-3", train, 128, 32)
    for i in (val[0], val[-1]):
        shutil.copy(demo["sites"] / "site-3" / dataset.manifest.samples[i].image, folder)
    shutil.copy(sorted((demo["out"] / "raw" / "site-3").glob("Case*[0-9].nii.gz"))[0], folder / "scan.nii.gz")
    return folder


@pytest.mark.integration
def test_monai_bundle_run_writes_the_masks_fedfms_predict_writes(demo_fedmsa_run, demo_bundle, tmp_path):
    inputs = validation_inputs(demo_fedmsa_run, tmp_path / "inputs")
    ran = monai_run(demo_bundle, "--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "bundle_masks"))
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "3 input(s) segmented, 3 file(s) written" in ran.stdout
    run_dir = demo_fedmsa_run["run_dir"]
    done = fedfms_predict(*map(str, sorted(inputs.iterdir())), "--weights", str(run_dir / "app_server" / "FL_global_model.pt"),
                          "--job", str(demo_fedmsa_run["job"]), "--classes", "white_matter",
                          "--out", str(tmp_path / "predict_masks"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert assert_same_masks(tmp_path / "bundle_masks", tmp_path / "predict_masks") > 0
    # outputs are never replaced silently: a second run into the same folder is refused
    before = {p: p.read_bytes() for p in (tmp_path / "bundle_masks").iterdir()}
    with pytest.raises(DataError, match="already exists"):
        in_process_run(demo_bundle, dataset_dir=str(inputs), output_dir=str(tmp_path / "bundle_masks"))
    assert {p: p.read_bytes() for p in (tmp_path / "bundle_masks").iterdir()} == before


@pytest.mark.integration
def test_the_bundle_carries_the_travel_set_and_monais_metadata_fields(demo_fedmsa_run, demo_bundle):
    from monai.bundle import ConfigWorkflow

    saved = torch.load(demo_bundle / MODEL_FILE, weights_only=True)
    cfg = ModelConfig.from_dict(json.loads((demo_bundle / "configs" / "inference.json").read_text())["model_config"])
    model = build_model(ModelConfig(**{**cfg.to_dict(), "pretrained": False}))
    assert sorted(saved) == sorted(travel_keys(model, "fedmsa"))
    assert not [k for k in saved if not is_travel_key(k, "fedmsa")]  # no frozen encoder tensor
    assert not [k for k in saved if k.startswith(("image_encoder.patch_embed", "prompt_encoder"))]
    global_model = torch.load(demo_fedmsa_run["run_dir"] / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], global_model[k]) for k in saved)
    # what a site sent never includes data; the bundle holds weights, configs and text only
    files = sorted(p.relative_to(demo_bundle).as_posix() for p in demo_bundle.rglob("*") if p.is_file())
    assert files == ["configs/inference.json", "configs/logging.conf", "configs/metadata.json", "docs/README.md",
                     "docs/model_card.json", "docs/model_card.md", MODEL_FILE]

    meta = json.loads((demo_bundle / "configs" / "metadata.json").read_text())
    workflow = ConfigWorkflow(config_file=str(demo_bundle / "configs" / "inference.json"), workflow_type=None,
                              logging_file=False)
    workflow.initialize()
    assert workflow.check_properties() == []  # MONAI's required metadata (versions) are there
    inputs = meta["network_data_format"]["inputs"]["image"]
    assert inputs["num_channels"] == 3 and inputs["spatial_shape"] == [128, 128]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "white_matter"}
    card = json.loads((demo_bundle / "docs" / "model_card.json").read_text())
    assert card["exported"]["sha256"] and card["exported"]["model"] == "final"
    assert meta["eval_metrics"]["mean_dice"] == pytest.approx(card["scores"]["average"]["global_final"]["dice"])
    readme = (demo_bundle / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run --config_file configs/inference.json" in readme and "--sam_checkpoint" in readme


@pytest.mark.integration
def test_best_and_personal_models_and_what_a_bundle_refuses(demo_fedmsa_run, demo_bundle, tmp_path):
    run = demo_fedmsa_run["workspace"]
    best = export_bundle(run, tmp_path / "best", model="best")
    saved = torch.load(best / MODEL_FILE, weights_only=True)
    kept = torch.load(demo_fedmsa_run["run_dir"] / "app_server" / "best_FL_global_model.pt", weights_only=True)["model"]
    assert sorted(saved) == sorted(kept) and all(torch.equal(saved[k], kept[k]) for k in saved)
    with pytest.raises(DataError, match="already exists"):
        export_bundle(run, tmp_path / "best")

    # a personalised model saved as a whole state dict: the frozen encoder's own tensors are left out...
    cfg = ModelConfig(variant="tiny", mode="fedmsa", pretrained=True, checkpoint=str(DEMO_CHECKPOINT))
    model = build_model(cfg)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(full, tmp_path / "personal.pt")
    personal = export_bundle(run, tmp_path / "personal", personal=tmp_path / "personal.pt")
    assert sorted(torch.load(personal / MODEL_FILE, weights_only=True)) == sorted(travel_state_dict(model, "fedmsa"))
    assert json.loads((personal / "docs" / "model_card.json").read_text())["exported"]["model"] == "personalised"
    # ...and one whose "frozen" tensors changed is refused (the bundle would not reproduce it)
    full["image_encoder.patch_embed.proj.weight"] += 0.5
    torch.save(full, tmp_path / "changed.pt")
    with pytest.raises(CheckpointError, match="differ from the frozen encoder"):
        export_bundle(run, tmp_path / "changed", personal=tmp_path / "changed.pt")
    assert not (tmp_path / "changed").exists()

    # another SAM checkpoint than the one the federation trained on: refused before anything is written
    sam = torch.load(DEMO_CHECKPOINT, weights_only=True)
    sam["image_encoder.blocks.0.attn.qkv.weight"] = sam["image_encoder.blocks.0.attn.qkv.weight"] + 0.01
    torch.save(sam, tmp_path / "other_sam.pth")
    inputs = validation_inputs(demo_fedmsa_run, tmp_path / "inputs")
    with pytest.raises(CheckpointError, match="frozen encoder built from SAM checkpoint"):
        in_process_run(demo_bundle, dataset_dir=str(inputs), output_dir=str(tmp_path / "masks"),
                       sam_checkpoint=str(tmp_path / "other_sam.pth"))
    assert not (tmp_path / "masks").exists()


# ----------------------------------------------------------------------------------------------------------------
# run folders made here: a -PT FedMSA and a pretrained FedSAM model, no FLARE


def fake_run(root: Path, model_config: dict, seed: int) -> Path:
    """A server run folder as FLARE leaves it (global model in the persistor's layout, the deployed client config, a
    run record): the model's travel set nudged away from its initial values, so the masks are not trivial."""
    cfg = ModelConfig.from_dict(model_config)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    travel = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
              for k, v in travel_state_dict(model, cfg.mode).items()}
    app = root / "server" / "simulate_job" / "app_server"
    (app / "config").mkdir(parents=True)
    torch.save({"model": travel, "train_conf": {}}, app / "FL_global_model.pt")
    client = {"format_version": 2, "executors": [{"tasks": ["train"], "executor": {
        "path": "fedfms.flare.executor.FedFMSExecutor", "args": {"model_config": model_config, "train_config": {}}}}]}
    (app / "config" / "config_fed_client.json").write_text(json.dumps(client))
    record = {"status": "completed", "expected_sites": ["a"], "start_round": 0, "last_round": 0, "best": None,
              "rounds": [{"round": 0, "seconds": 1.0, "updated_model": True, "accepted": {"a": 4}, "failed": {},
                          "missing": []}]}
    (app.parent / "fedfms_run.json").write_text(json.dumps(record))
    return root


def some_inputs(folder: Path) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :80]
    disc = ((yy - 40) ** 2 + (xx - 44) ** 2) < 400
    Image.fromarray((255 * np.clip(rng.uniform(0.1, 0.4, (96, 80)) + 0.5 * disc, 0, 1)).astype(np.uint8)).save(folder / "a.png")
    volume = rng.uniform(0, 100, (64, 64, 4)).astype(np.float32) + 200 * disc[:64, :64, None]
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.0, 1.0])), str(folder / "b.nii.gz"))
    return sorted(folder.iterdir())


@pytest.mark.parametrize("model_config", [
    {"variant": "tiny", "mode": "fedmsa", "num_classes": 1, "pretrained": False, "init_seed": 3},
    {"variant": "tiny", "mode": "fedsam", "num_classes": 2, "pretrained": True, "checkpoint": str(DEMO_CHECKPOINT)},
], ids=["fedmsa_random_init", "fedsam_pretrained"])
def test_bundles_that_need_no_sam_checkpoint_predict_like_fedfms_predict(tmp_path, model_config):
    """-PT FedMSA: the frozen encoder is rebuilt from init_seed; FedSAM: every weight is in the bundle, so neither
    names a SAM checkpoint, and MONAI's runner (in this process) writes fedfms predict's masks."""
    run = fake_run(tmp_path / "run", model_config, seed=1)
    out = export_bundle(run, tmp_path / "bundle")
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert inference["sam_checkpoint"] is None and inference["model_config"]["pretrained"] is False
    saved = torch.load(out / MODEL_FILE, weights_only=True)
    mode = model_config["mode"]
    assert sorted(saved) == sorted(travel_keys(build_model(ModelConfig(**{**model_config, "pretrained": False})), mode))
    if mode == "fedmsa":
        assert inference["frozen_fingerprint"] and "init_seed` 3" in (out / "docs" / "README.md").read_text()
    inputs = some_inputs(tmp_path / "inputs")
    in_process_run(out, dataset_dir=str(tmp_path / "inputs"), output_dir=str(tmp_path / "bundle_masks"))
    predict_cases(model_config, run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt", inputs,
                  tmp_path / "predict_masks")
    assert assert_same_masks(tmp_path / "bundle_masks", tmp_path / "predict_masks") > 0


def test_export_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    from fedfms.cli import main

    run = fake_run(tmp_path / "run", {"variant": "tiny", "mode": "fedmsa", "num_classes": 1, "pretrained": False}, 0)
    for argv, message in [
        (["export", "bundle", str(run), str(tmp_path / "b1"), "--model", "best"], "no best_FL_global_model.pt"),
        (["export", "bundle", str(tmp_path / "nowhere"), str(tmp_path / "b2")], "not a folder"),
        (["export", "bundle", str(run), str(tmp_path / "b3"), "--personal", str(tmp_path / "missing.pt")], "not found"),
        (["export", "bundle", str(run), str(tmp_path / "b4"), "--classes", "a", "b"], "predicts 1 class"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    first = export_bundle(run, tmp_path / "b6")
    (first / "docs" / "note.txt").write_text("replaced with --overwrite")
    export_bundle(run, tmp_path / "b6", overwrite=True)
    assert not (first / "docs" / "note.txt").exists() and (first / MODEL_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b6", "run"]  # no staging or set-aside folder left
    (tmp_path / "notabundle").mkdir()
    with pytest.raises(DataError, match="is not a bundle"):
        export_bundle(run, tmp_path / "notabundle", overwrite=True)
    wrong = tmp_path / "wrong.pt"
    torch.save({"mask_decoder.iou_token.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(CheckpointError, match="does not match a tiny fedmsa model"):
        export_bundle(run, tmp_path / "b5", personal=wrong)
    with pytest.raises(DataError, match="no input files"):
        from fedfms.bundle import input_files

        input_files(tmp_path)


def test_a_checkpoint_template_is_expanded_by_monais_parser_at_run_time(monkeypatch, tmp_path):
    """A job's ``$FEDFMS_SAM_CHECKPOINT`` becomes a MONAI expression (a bare ``$...`` string would be Python to MONAI)."""
    from monai.bundle import ConfigParser

    from fedfms.bundle import _checkpoint_default, inference_config, model_config_for

    cfg = ModelConfig(variant="vit_b", mode="fedmsa", checkpoint="$FEDFMS_SAM_CHECKPOINT")
    default = _checkpoint_default(cfg.checkpoint, cfg)
    (tmp_path / "inference.json").write_text(json.dumps(inference_config({"variant": "vit_b"}, default, None, ["c"], False)))
    monkeypatch.setenv("FEDFMS_SAM_CHECKPOINT", "/models/sam_vit_b_01ec64.pth")
    parser = ConfigParser()
    parser.read_config(str(tmp_path / "inference.json"))
    assert parser.get_parsed_content("sam_checkpoint") == "/models/sam_vit_b_01ec64.pth"
    monkeypatch.delenv("FEDFMS_SAM_CHECKPOINT")
    parser = ConfigParser()
    parser.read_config(str(tmp_path / "inference.json"))
    unset = parser.get_parsed_content("sam_checkpoint")
    with pytest.raises(ConfigError, match="environment variable that is not set"):
        model_config_for({"variant": "vit_b", "pretrained": True}, unset)
    assert _checkpoint_default(None, cfg) == "sam_vit_b_01ec64.pth"
