"""The evaluation protocol: held-out sites scored on all their samples, the pooled (centralised) baseline,
one leave-one-site-out fold through FLARE's simulator, and the CLI's one-line errors.

Three learnable synthetic sites with different contrast; the tiny FedMSA model at 128 px (masks 32 px)."""

from __future__ import annotations

import json
import re
import shutil
import math

import numpy as np
import pytest
import torch

from fedfms.cli import main
from fedfms.data.site_dataset import SiteDataset
from fedfms.data.synthetic import make_disc_site
from fedfms.errors import ConfigError
from fedfms.evaluation import EvaluationError, collect, evaluate_sites, format_loso_table, train_centralized
from fedfms.training.weights_files import history_path, last_weights_path
from fedfms.evaluation.results import FOLD_FILE, RESULTS_CSV, RESULTS_JSON, write_csv
from fedfms.flare import loso_runner
from fedfms.flare.loso_runner import job_source, leave_one_site_out
from fedfms.flare.jobs import CPU_TRAIN
from fedfms.flare.fed_job import write_job
from fedfms.flare.simulate import server_job_dir
from fedfms.models import ModelConfig, build_model, travel_state_dict
from fedfms.training.metrics import SegmentationMetric
from fedfms.training.predict import load_model, load_weights
from fedfms.training.trainer import LocalTrainer, TrainConfig

MODEL = ModelConfig("tiny", "fedmsa", num_classes=1, pretrained=False, init_seed=0)  # = the fedmsa_tiny job's model
TRAIN = TrainConfig(lr=1e-3, loss="bce_dice", val_fraction=0.2, progress=False, threads=1)  # steady on a busy CPU


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    for i, (name, brightness) in enumerate((("a", 0.3), ("b", 0.4), ("c", 0.35))):
        make_disc_site(root / name, site=name, num_volumes=5, slices_per_volume=8, brightness=brightness, seed=10 + i)
    return root


@pytest.fixture(scope="module")
def central(sites, tmp_path_factory):
    """Pooled training on a and b, a few seconds; c stays unseen."""
    out = tmp_path_factory.mktemp("central") / "model.pt"
    return train_centralized(MODEL, TRAIN, [sites / "a", sites / "b"], epochs=6, out_weights=out)


def _untrained(path):
    torch.save({"model": travel_state_dict(build_model(MODEL), MODEL.mode)}, path)
    return path


def test_evaluate_sites_scores_every_sample_like_an_independent_computation(sites, central):
    rows = evaluate_sites(MODEL, central, [sites / "c", sites / "a"], batch_size=4)
    assert [r["site"] for r in rows] == ["c", "a"]
    model = load_model(MODEL, central)
    assert rows[1]["num_samples"] == 40
    for row, name in zip(rows[:1], ("c",)):
        data = SiteDataset(sites / name, image_size=128, mask_size=32)
        assert row["num_samples"] == len(data) == 40 and row["num_volumes"] == 5
        # one sample at a time, in reverse order: batching and order must not matter
        metric = SegmentationMetric(["disc"])
        tp_fp_fn = {}
        with torch.no_grad():
            for i in reversed(range(len(data))):
                item = data[i]
                logits = model(item["image"][None])
                metric.update(logits, item["mask"][None], [item["volume"]])
                pred, truth = (torch.sigmoid(logits)[0, 0] > 0.5).numpy(), item["mask"][0].numpy() > 0.5
                counts = tp_fp_fn.setdefault(item["volume"], np.zeros(3))
                counts += [(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()]
        expected = metric.aggregate()
        for key in ("dice", "iou", "volume_dice", "volume_iou"):
            assert row[key] == pytest.approx(expected[key], abs=1e-6), key
        assert row["dice_per_class"] == pytest.approx(expected["dice_per_class"], abs=1e-6)
        # 3D Dice straight from voxel counts summed per volume
        volume_dice = np.mean([2 * tp / (2 * tp + fp + fn) for tp, fp, fn in tp_fp_fn.values()])
        assert row["volume_dice"] == pytest.approx(volume_dice, abs=1e-6)


def test_centralized_training_learns_and_saves_the_selected_epoch(sites, central, tmp_path):
    before = evaluate_sites(MODEL, _untrained(tmp_path / "untrained.pt"), [sites / "c"])[0]["dice"]
    after = evaluate_sites(MODEL, central, [sites / "c"])[0]["dice"]
    assert after > 0.5 and after > before + 0.25, (before, after)

    history = json.loads(history_path(central).read_text())
    val = [h["val_dice"] for h in history["history"]]
    assert len(val) == 6 and history["selected_epoch"] == 1 + int(np.argmax(val))
    assert history["train_samples"] == 64 and history["val_samples"] == 16  # 4 + 1 volumes of 8 slices per site
    # the file holds the selected epoch: its pooled validation Dice is the one recorded for that epoch
    check = LocalTrainer(MODEL, TRAIN, [str(sites / "a"), str(sites / "b")])
    check.load_travel_weights(load_weights(central))
    assert check.evaluate("val")["dice"] == pytest.approx(max(val), abs=1e-6)
    assert last_weights_path(central).is_file()
    with pytest.raises(ConfigError, match="already exists"):
        train_centralized(MODEL, TRAIN, [sites / "a"], epochs=1, out_weights=central)


def _fold(workspace, holdout, signature, status="done", dice=0.5):
    (workspace / holdout).mkdir(parents=True)
    scores = {"dice": dice, "iou": dice / 2, "volume_dice": dice, "volume_iou": None, "num_samples": 10,
              "classes": ["disc", "cup"], "dice_per_class": [dice + 0.1, dice - 0.1], "iou_per_class": [dice, None]}
    record = {"signature": signature, "holdout": holdout, "status": status,
              "results": {"federated": scores, "centralized": {**scores, "dice": dice + 0.1}}}
    (workspace / holdout / FOLD_FILE).write_text(json.dumps(record))


def test_results_gather_finished_folds_of_the_same_experiment(tmp_path):
    sig = {"job": "fedmsa_tiny", "sites": ["a", "b", "c", "d"], "rounds": 2, "train_overrides": {}, "model_overrides": {}}
    _fold(tmp_path, "a", sig, dice=0.4)
    _fold(tmp_path, "c", sig, dice=0.6)
    _fold(tmp_path, "b", {**sig, "rounds": 3})
    _fold(tmp_path, "d", sig, status="failed")
    rows, report = collect(tmp_path, sig)
    assert report["held_out"] == ["a", "c"] and report["missing_folds"] == ["b", "d"]
    federated = next(r for r in rows if r["method"] == "federated")
    assert federated["dice"] == pytest.approx(0.5) and federated["iou"] == pytest.approx(0.25)
    assert federated["volume_iou"] is None and federated["num_folds"] == 2
    assert any("other settings" in n for n in report["notes"]) and any("did not finish" in n for n in report["notes"])
    assert federated["dice_per_class"] == pytest.approx([0.6, 0.4]) and federated["iou_per_class"] == [pytest.approx(0.5), None]
    lines = write_csv(rows, tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == "method,held_out_site,dice,iou,volume_dice,volume_iou,dice_disc,iou_disc,dice_cup,iou_cup,num_samples"
    assert lines[1] == "federated,a,0.400000,0.200000,0.400000,,0.500000,0.400000,0.300000,,10"
    assert lines[3] == "federated,average,0.500000,0.250000,0.500000,,0.600000,0.500000,0.400000,,20"
    table = format_loso_table(rows, report["held_out"]).splitlines()
    assert table[1].split() == ["method", "Dice", "IoU", "Dice", "IoU", "Dice", "IoU"]
    assert table[3].split()[-6:] == ["0.400", "0.200", "0.600", "0.300", "0.500", "0.250"]


def test_a_job_folder_is_written_again_for_the_fold_with_rounds_and_sites_set(tmp_path):
    job = write_job("fedmsa_tiny", tmp_path / "job", train={"lr": 5e-4})
    source = job_source(job)
    out = source.write(tmp_path / "copy", rounds=7, sites=["a", "b", "c"])
    server = json.loads((out / "app/config/config_fed_server.json").read_text())
    assert (server["num_rounds"], server["min_clients"]) == (7, 2)  # a majority of 3 must contribute each round
    monitor = next(c for c in server["components"] if c["id"] == "federation_monitor")
    assert monitor["args"]["expected_sites"] == ["a", "b", "c"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["deploy_map"] == {"app": ["server", "a", "b", "c"]}
    client = json.loads((out / "app/config/config_fed_client.json").read_text())
    assert client["executors"][0]["executor"]["args"]["train_config"]["lr"] == 5e-4  # the job's own settings kept
    assert json.loads((job / "app/config/config_fed_server.json").read_text())["num_rounds"] == 2  # source untouched
    assert job_source(job).settings()["num_rounds"] == 2  # from the recipe
    # a job written by hand (no recipe) cannot be written again for a fold: refused before anything runs
    hand = tmp_path / "hand"
    shutil.copytree(job, hand)
    meta = json.loads((hand / "meta.json").read_text())
    meta.pop("fedfms_recipe")
    (hand / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="written by hand .*'fedfms job new'"):
        job_source(hand).write(tmp_path / "copy2", rounds=7, sites=["a", "b", "c"])
    assert not (tmp_path / "copy2").exists()
    assert job_source(hand).settings()["num_rounds"] is None  # its model and train config still read (evaluate, centralized)
    with pytest.raises(ConfigError, match="overrides apply to job variants"):
        job_source(job, train_overrides={"lr": 1.0})


@pytest.mark.integration
def test_one_loso_fold_federated_and_centralized(sites, tmp_path, capsys, monkeypatch):
    ws = tmp_path / "loso"
    epochs = 2  # not the tiny job's 20: nothing here asserts learning (the demo does)
    assert CPU_TRAIN["epochs"] != epochs
    forked = []

    class Fork(loso_runner.ForkedProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            forked.append(self)

    monkeypatch.setattr(loso_runner, "ForkedProcess", Fork)
    rows = leave_one_site_out("fedmsa_tiny", sites, ["a", "b", "c"], ws, rounds=1, holdouts=["c"], centralized=True,
                              train_overrides={"epochs": epochs})
    out = capsys.readouterr().out
    assert "fold 1/1: hold out c; train on a, b" in out and "federated, final global model" in out
    # the fold's `fedfms simulate` was forked from the fork server, not started (and importing) afresh; its one line
    # per round reached the console through the fork's pipe
    assert [p.args[2:4] for p in forked] == [["fedfms.cli", "simulate"]] and forked[0].returncode == 0
    assert re.search(r"^  round 1/1  a loss \d\.\d{3} Dice \d\.\d{3} \| b loss ", out, re.M), out

    # 1 round: FLARE selects no best model (round 0 is never scored), so no federated_best row
    assert [r["method"] for r in rows] == ["federated", "centralized", "centralized_last"]
    assert all(set(r["sites"]) == {"c"} and r["num_folds"] == 1 for r in rows)
    report = json.loads((ws / RESULTS_JSON).read_text())
    assert report["held_out"] == ["c"] and report["missing_folds"] == ["a", "b"]
    fold = json.loads((ws / "c" / FOLD_FILE).read_text())
    assert fold["status"] == "done" and fold["train_sites"] == ["a", "b"]
    # centralised: rounds x the job's local epochs (as overridden)
    assert fold["centralized"]["epochs"] == 1 * epochs and fold["centralized"]["train_samples"] == 64
    # the job waited for exactly the two training sites
    meta = json.loads((ws / "c" / "job" / "meta.json").read_text())
    assert meta["min_clients"] == 2
    # the federated score is the final global model's on all of site c
    final = server_job_dir(ws / "c" / "simulator") / "app_server" / "FL_global_model.pt"
    again = evaluate_sites(MODEL, final, [sites / "c"])[0]
    assert rows[0]["sites"]["c"]["dice"] == pytest.approx(again["dice"], abs=1e-6)
    assert rows[0]["sites"]["c"]["num_samples"] == 40 and 0.0 <= rows[0]["dice"] <= 1.0
    csv_lines = (ws / RESULTS_CSV).read_text().splitlines()
    assert csv_lines[0].startswith("method,held_out_site,dice,iou") and len(csv_lines) == 1 + 3 * 2

    stamp = (ws / "c" / FOLD_FILE).stat().st_mtime_ns
    with pytest.raises(ConfigError, match=f"{ws / 'c'}: fold folder already exists"):
        leave_one_site_out("fedmsa_tiny", sites, ["a", "b", "c"], ws, rounds=1, holdouts=["c"])
    assert (ws / "c" / FOLD_FILE).stat().st_mtime_ns == stamp


def test_overwrite_never_removes_a_folder_it_did_not_make(sites, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a LOSO fold folder"):
        leave_one_site_out("fedmsa_tiny", sites, None, tmp_path, rounds=1, holdouts=["b"], overwrite=True)
    assert (tmp_path / "b" / "precious.txt").read_text() == "keep"


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_errors_are_one_line(sites, central, tmp_path, capsys, monkeypatch):
    ws = str(tmp_path / "ws")
    assert "does not exist" in _error(capsys, ["loso", "fedmsa_tiny", "--data-root", str(tmp_path / "none"), "--workspace", ws])
    loso = ["loso", "fedmsa_tiny", "--data-root", str(sites), "--workspace", ws]
    assert "not among the sites" in _error(capsys, [*loso, "--holdout", "z"])
    assert "--train: not valid JSON" in _error(capsys, [*loso, "--train", "{lr"])
    assert "neither a job variant" in _error(capsys, ["loso", "fedmsa_huge", "--data-root", str(sites), "--workspace", ws])
    assert "num_classes=2" in _error(capsys, [*loso, "--model", '{"num_classes": 2}'])
    monkeypatch.delenv("FEDFMS_SAM_CHECKPOINT", raising=False)
    assert "FEDFMS_SAM_CHECKPOINT" in _error(capsys, ["loso", "fedmsa", "--data-root", str(sites), "--workspace", ws])
    assert "checkpoint not found" in _error(capsys, ["loso", "fedmsa", "--data-root", str(sites), "--workspace", ws,
                                                     "--checkpoint", str(tmp_path / "sam.pth")])
    assert "needs --job" in _error(capsys, ["evaluate", str(sites / "c"), "--weights", str(central)])
    assert "does not match a tiny fedsam" in _error(capsys, ["evaluate", str(sites / "c"), "--weights", str(central),
                                                             "--job", "fedsam_tiny"])
    assert "already exists" in _error(capsys, ["centralized", str(sites / "a"), "--job", "fedmsa_tiny", "--out", str(central.parent)])
    hand = write_job("fedmsa_tiny", tmp_path / "hand")
    meta = json.loads((hand / "meta.json").read_text())
    meta.pop("fedfms_recipe")
    (hand / "meta.json").write_text(json.dumps(meta))
    assert "written by hand" in _error(capsys, ["loso", str(hand), "--data-root", str(sites), "--workspace", ws])
    assert "pass --epochs" in _error(capsys, ["centralized", str(sites / "a"), "--job", str(hand), "--out", str(tmp_path / "c")])
    assert not (tmp_path / "ws").exists()


def test_cli_evaluate_and_centralized(sites, central, tmp_path, capsys):
    assert main(["evaluate", str(sites / "c"), str(sites / "b"), "--weights", str(central), "--job", "fedmsa_tiny",
                 "--json", str(tmp_path / "scores.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["site", "Dice", "IoU"] and "average" in out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert [s["site"] for s in scores["sites"]] == ["c", "b"] and scores["average"]["num_samples"] == 80

    assert main(["centralized", str(sites / "a"), str(sites / "b"), "--test", str(sites / "c"), "--job", "fedmsa_tiny",
                 "--epochs", "1", "--train", '{"max_steps_per_epoch": 1}', "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "trained 1 epoch(s) on 64 pooled samples" in out and "last epoch (model_last.pt)" in out
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"model.pt", "model_last.pt", "model.json", "evaluation.json"}
    assert math.isfinite(json.loads((tmp_path / "c" / "evaluation.json").read_text())["selected epoch"][0]["num_samples"])


def test_a_failed_simulation_marks_the_fold_and_overwrite_reruns_it(sites, tmp_path, monkeypatch):
    def broken(job, workspace, clients, data_root, log_path, say=None, verbose=False):
        assert clients == ["b", "c"] and json.loads((job / "meta.json").read_text())["deploy_map"]["app"] == ["server", "b", "c"]
        log_path.write_text("starting\nRuntimeError: site b could not start\n")
        return 1

    monkeypatch.setattr(loso_runner, "simulate", broken)
    with pytest.raises(EvaluationError, match=r"fold a: the simulation failed \(exit code 1\).*could not start"):
        leave_one_site_out("fedmsa_tiny", sites, None, tmp_path, rounds=1, holdouts=["a"])
    assert json.loads((tmp_path / "a" / FOLD_FILE).read_text())["status"] == "failed"
    with pytest.raises(ConfigError, match="already exists"):
        leave_one_site_out("fedmsa_tiny", sites, None, tmp_path, rounds=1, holdouts=["a"])

    monkeypatch.setattr(loso_runner, "simulate", lambda *args, **kwargs: 0)  # "succeeds" but leaves no model behind
    (tmp_path / "a" / "stale.txt").write_text("from the failed run")
    with pytest.raises(EvaluationError, match="no FL_global_model.pt was written"):
        leave_one_site_out("fedmsa_tiny", sites, None, tmp_path, rounds=1, holdouts=["a"], overwrite=True)
    assert not (tmp_path / "a" / "stale.txt").exists()
    assert "no FL_global_model.pt" in json.loads((tmp_path / "a" / FOLD_FILE).read_text())["error"]
