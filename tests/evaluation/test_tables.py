"""`fedfms table1` (the paper's Table 1 from LOSO workspaces) and `fedfms table2` (costs per site).

The layout tests build LOSO workspaces from fold records through the same `collect` that `fedfms loso` uses;
the integration test runs `fedfms loso` for real on two small synthetic sites."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fedfms.cli import main
from fedfms.data.synthetic import make_disc_site
from fedfms.evaluation.results import FOLD_FILE, RESULTS_JSON, collect
from fedfms.flavours import FLAVOURS
from fedfms.models import ModelConfig, build_model, build_model_on_meta
from fedfms.reporting.tables import (NEEDS_GPU, _variant_guess, build_table1, build_table2, count_flops, format_table1, format_table2,
                           gpu_costs, method_label, static_costs, table1_cells, write_table1_csv)

PROSTATE = ["BIDMC", "HK", "UCL"]
VIT_B_MSA = {"variant": "vit_b", "mode": "fedmsa", "num_classes": 1, "pretrained": True}
UNET = {"variant": "unet", "mode": "fedsam", "num_classes": 1, "pretrained": False}


def _scores(dice, ref, classes=("prostate",)):
    n = len(classes)
    return {"dice": dice, "iou": dice - 0.1, "volume_dice": dice, "volume_iou": dice, "dice_reference": ref,
            "iou_reference": ref - 0.05, "classes": list(classes), "num_samples": 10,
            "dice_per_class": [dice + 0.01 * i for i in range(n)], "iou_per_class": [dice - 0.1] * n,
            "dice_reference_per_class": [ref] * n, "iou_reference_per_class": [ref - 0.05] * n, "reference_on": "logits"}


def workspace(root, name, sites, model, train=None, dice=None, methods=("federated", "centralized_last"), classes=("prostate",),
              holdouts=None, rounds=100):
    """A LOSO workspace as `fedfms loso` leaves it: fold.json records, then loso_results.json from `collect`."""
    ws = root / name
    signature = {"job": name, "sites": sites, "rounds": rounds, "train_overrides": {}, "model_overrides": {}}
    for k, site in enumerate(holdouts or sites):
        (ws / site).mkdir(parents=True)
        base = (dice or {}).get(site, 0.5 + 0.1 * k)
        results = {m: _scores(base + (0.01 if m.startswith("centralized") else 0), base + 0.2, classes) for m in methods}
        record = {"signature": signature, "holdout": site, "status": "done", "results": results,
                  "model_config": model, "train_config": train or {}}
        (ws / site / FOLD_FILE).write_text(json.dumps(record))
    rows, report = collect(ws, signature)
    report["data_root"] = "/data/prostate"
    (ws / RESULTS_JSON).write_text(json.dumps(report))
    return ws


def test_method_labels_follow_the_paper():
    assert method_label(VIT_B_MSA, centralized=False) == "FedMSA"
    assert method_label(VIT_B_MSA, centralized=True) == "MSA (centralised)"
    assert method_label({"variant": "vit_l", "mode": "fedsam", "pretrained": False}, False) == "FedSAM-L (-PT)"
    assert method_label({"variant": "vit_l", "mode": "fedmsa", "pretrained": False}, True) == "MSA-L (-PT, centralised)"
    assert method_label(UNET, False) == "FedU-Net" and method_label(UNET, True) == "U-Net (centralised)"


def test_table1_layout_rows_in_the_papers_order_and_both_rules(tmp_path):
    msa = workspace(tmp_path, "fedmsa", PROSTATE, VIT_B_MSA, dice={"BIDMC": 0.8, "HK": 0.7, "UCL": 0.6})
    unet = workspace(tmp_path, "fedunet", PROSTATE, UNET, holdouts=["BIDMC", "UCL"], methods=("federated",))
    sam = workspace(tmp_path, "fedsam", PROSTATE, {**VIT_B_MSA, "mode": "fedsam"})
    [table] = build_table1([msa, unet, sam])
    assert table.dataset == "Prostate Cancer" and table.sites == PROSTATE
    assert [r["label"] for r in table.rows] == ["FedU-Net", "FedSAM", "SAM (centralised)", "FedMSA", "MSA (centralised)"]
    header, rows, raw = table1_cells(table, "honest")
    assert header == ["Model", "BIDMC Dice", "BIDMC IoU", "HK Dice", "HK IoU", "UCL Dice", "UCL IoU", "Average Dice", "Average IoU"]
    fedmsa = rows[3]
    assert fedmsa[1:] == ["0.800", "0.700", "0.700", "0.600", "0.600", "0.500", "0.700", "0.600"]
    assert raw[3][7] == pytest.approx(0.7)  # the unweighted mean over held-out sites
    # FedU-Net held out two of three sites: '-' for HK, the average over the other two, and a note
    assert rows[0][3:5] == ["-", "-"] and rows[0][7] == "0.550"
    assert any("FedU-Net (fedunet): not yet held out: HK" in n for n in table.notes)
    _, ref_rows, _ = table1_cells(table, "reference")
    assert ref_rows[3][1:3] == ["1.000", "0.950"]  # dice_reference = dice + 0.2, iou_reference = that - 0.05

    text = format_table1([table], "both")
    assert text.count("### Table 1: Prostate Cancer") == 2
    assert "### Table 1: Prostate Cancer, this project's scoring rule" in text
    assert "### Table 1: Prostate Cancer, the paper code's scoring rule" in text
    assert "Scoring: the paper code's rule: per 2D slice and class, thresholds 0.1, 0.3, 0.5, 0.7, 0.9" in text
    assert "(the U-Net rows: on its sigmoid probabilities" in text
    assert "Scoring: this project's rule: sigmoid > 0.5" in text and "after 100 round(s)" in text
    assert "| FedMSA | 0.800 | 0.700 | 0.700 | 0.600 | 0.600 | 0.500 | 0.700 | 0.600 |" in text

    out = write_table1_csv([table], tmp_path / "t.csv", "both")
    lines = list(csv.DictReader(out.open()))
    assert len(lines) == 2 * (3 * 4 + 1 * 3 + 1 * 4)  # per rule: 4 full rows x (3 sites + avg), FedU-Net 2 sites + avg
    row = next(r for r in lines if r["model"] == "FedMSA" and r["held_out_site"] == "HK" and r["scoring"] == "reference")
    assert (row["dice"], row["iou"], row["flavour"], row["class"]) == ("0.900000", "0.850000", "project", "all")


NNUNET = {"variant": "nnunet", "mode": "fedsam", "num_classes": 1, "pretrained": False}  # the fednnunet jobs' model


def test_fednnunet_rows_follow_fedunet_and_are_scored_on_probabilities(tmp_path):
    assert method_label(NNUNET, False) == "FednnU-Net" and method_label(NNUNET, True) == "nnU-Net (centralised)"
    nn = workspace(tmp_path, "fednnunet", PROSTATE, NNUNET, train={"iterations_per_epoch": 250})
    unet = workspace(tmp_path, "fedunet", PROSTATE, UNET)
    msa = workspace(tmp_path, "fedmsa", PROSTATE, VIT_B_MSA)
    [table] = build_table1([msa, nn, unet])
    assert [r["label"] for r in table.rows] == ["FedU-Net", "U-Net (centralised)", "FednnU-Net", "nnU-Net (centralised)",
                                                "FedMSA", "MSA (centralised)"]
    assert {r["flavour"] for r in table.rows} == {"project"}  # no '[... flavour]' tags: nnU-Net has no flavours
    assert "(the U-Net and nnU-Net rows: on their sigmoid probabilities" in format_table1([table], "reference")
    # a workspace whose folds do not record their model is named from its job: nnunet before unet
    assert _variant_guess("runs/fednnunet_tiny")["variant"] == "nnunet" and _variant_guess("fedunet")["variant"] == "unet"


def test_table1_groups_datasets_and_shows_classes_flavours_and_gaps(tmp_path):
    fundus = ["REFUGE", "ORIGA"]
    classes = ("disc", "cup")
    a = workspace(tmp_path, "msa", fundus, {**VIT_B_MSA, "num_classes": 2}, classes=classes)
    ref_model = {**VIT_B_MSA, "num_classes": 2, **FLAVOURS["reference"]["model"]}
    b = workspace(tmp_path, "msa_ref", fundus, ref_model, train={"pos_weight": 2}, classes=classes, methods=("federated",))
    c = workspace(tmp_path, "prostate", PROSTATE, VIT_B_MSA)
    tables = build_table1([a, b, c])
    assert [t.dataset for t in tables] == ["Fundus", "Prostate Cancer"]
    fundus_table = tables[0]
    assert [r["label"] for r in fundus_table.rows] == [
        "FedMSA [project flavour]", "MSA (centralised) [project flavour]", "FedMSA [reference flavour]"]
    header, rows, _ = table1_cells(fundus_table, "honest")
    assert header[1:5] == ["REFUGE disc Dice", "REFUGE disc IoU", "REFUGE cup Dice", "REFUGE cup IoU"]
    assert rows[0][1] == "0.500" and rows[0][3] == "0.510"  # per-class values
    assert "Flavour: project, reference" in format_table1([fundus_table], "honest")

    # a run scored before the paper code's rule was recorded: '-' and a caption that says why
    old = json.loads((c / RESULTS_JSON).read_text())
    for row in old["rows"]:
        for scores in row["sites"].values():
            scores.pop("dice_reference"), scores.pop("iou_reference")
    (c / RESULTS_JSON).write_text(json.dumps(old))
    text = format_table1(build_table1([c]), "reference")
    assert "| FedMSA | - | - |" in text and "folds scored before this rule was recorded" in text
    # best models asked for, none there (e.g. a 1-round run): said, not faked
    [best] = build_table1([c], select="best")
    assert best.rows == [] and "no 'federated_best' results" in best.notes[0]


def test_table1_errors_are_one_line(tmp_path, capsys):
    def error(argv):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "no such folder" in error(["table1", str(tmp_path / "none")])
    (tmp_path / "empty").mkdir()
    assert "loso_results.json: not found" in error(["table1", str(tmp_path / "empty")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RESULTS_JSON).write_text("{not json")
    assert "unreadable" in error(["table1", str(tmp_path / "bad")])
    ws = workspace(tmp_path, "ok", PROSTATE, VIT_B_MSA)
    assert "ending in .md" in error(["table1", str(ws), "--out", str(tmp_path / "t.txt")])
    assert "does not exist" in error(["table1", str(ws), "--out", str(tmp_path / "no" / "t.md")])
    assert "expected some of tiny, vit_b, vit_l, unet" in error(["table2", "--variants", "vit_h"])
    if not torch.cuda.is_available():
        assert "need a GPU" in error(["table2", "--variants", "tiny", "--gpu"])


def test_flops_are_counted_not_estimated():
    """The meta-device count equals the count of a real CPU forward/backward where every operator has a FLOP
    formula (segment-anything's attention), and the fused attention costs more FLOPs than the stock one."""
    cfg = ModelConfig("tiny", "fedmsa", pretrained=False, fused_attention=False)
    for train in (False, True):
        assert count_flops(build_model_on_meta(cfg), train) == count_flops(build_model(cfg), train, device="cpu")
    fused = ModelConfig("tiny", "fedmsa", pretrained=False)
    assert count_flops(build_model_on_meta(fused), False) > count_flops(build_model_on_meta(cfg), False)
    # a linear layer by hand: 2 * in * out per row forward; forward + backward (input and weight grads) = 3x
    lin = torch.nn.Linear(64, 32, bias=False)

    class Flat(torch.nn.Module):
        image_size = 8

        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x.reshape(1, -1)[:, :64])

    assert count_flops(Flat(), train=False, device="cpu") == 2 * 64 * 32


def test_table2_sizes_and_the_paper_scale_flops():
    rows = build_table2(["vit_b"], attention="stock", gpu=False)
    sam, msa = rows
    assert (sam["mode"], msa["mode"]) == ("fedsam", "fedmsa")
    assert sam["total_params"] == 93_735_472 + 4  # SAM ViT-B + Conv2d(3, 1) head
    assert msa["trainable_params"] == 11_159_276 - 4  # 2-class head in the README, 1-class here
    assert round(msa["bytes_fp32"] / 1e6, 1) == 44.6 and round(msa["bytes_16bit"] / 1e6, 1) == 22.3
    # FLOPs per 1024 px image with segment-anything's attention (../shared/REFERENCE.md: 0.98 / 2.92 / 2.32 T)
    assert sam["flops_inference"] / 1e12 == pytest.approx(0.98, abs=0.01)
    assert sam["flops_train"] / 1e12 == pytest.approx(2.92, abs=0.01)
    assert msa["flops_train"] / 1e12 == pytest.approx(2.32, abs=0.01)
    text = format_table2(rows)
    if not torch.cuda.is_available():
        assert text.count(NEEDS_GPU) == 6 and "not measured, no GPU here" in text
    assert "| SAM ViT-B | FedMSA | 100,836,404 | 11,159,272 | 44.6 | 22.3 | 2.32 T | 1.03 T |" in text
    unet = static_costs("unet", "fedsam")
    assert unet["mode"] == "fedsam" and unet["attention"] is None and unet["trainable_params"] == unet["total_params"]


def test_table2_gpu_columns_code_path_on_cpu():
    """The timing function runs (here on the CPU, for the test only); the table shows its numbers only from a GPU."""
    row = {**static_costs("tiny", "fedmsa"), **gpu_costs("tiny", "fedmsa", batch_size=2, steps=1, warmup=1, device="cpu")}
    assert row["step_s"] > 0 and row["predict_s"] > 0 and row["peak_bytes"] is None
    assert "| 0." in format_table2([row]) and "measured on cpu" in format_table2([row])
    reference = static_costs("tiny", "fedmsa", flavour="reference")
    assert reference["trainable_params"] == static_costs("tiny", "fedmsa")["trainable_params"] - 4  # no 1-class head


@pytest.mark.integration
def test_table1_end_to_end_from_loso_runs(tmp_path, capsys):
    """Two small synthetic sites: tiny FedMSA (with the centralised baseline) and FedU-Net, one fold each, through
    `fedfms loso`, then `fedfms table1` on both workspaces (about 1.5 min on 2 cores). Rows averaged over several
    folds, and the gaps of a half-run LOSO, are checked on fold files in the tests above."""
    root = tmp_path / "sites"
    for i, (name, brightness) in enumerate((("a", 0.3), ("b", 0.4))):
        make_disc_site(root / name, site=name, num_volumes=3, slices_per_volume=4, brightness=brightness, seed=20 + i)
    msa, unet = tmp_path / "ws_msa", tmp_path / "ws_unet"
    assert main(["loso", "fedmsa_tiny", "--data-root", str(root), "--workspace", str(msa), "--rounds", "1",
                 "--holdout", "a", "--centralized", "--scoring", "both"]) == 0
    assert main(["loso", "fedunet", "--data-root", str(root), "--workspace", str(unet), "--rounds", "1", "--holdout", "a",
                 "--model", '{"image_size": 128}', "--train", '{"threads": 1, "device": "cpu"}']) == 0
    loso_out = capsys.readouterr().out
    assert "the paper code's rule (ref Dice, ref IoU)" in loso_out
    fold = json.loads((msa / "a" / FOLD_FILE).read_text())
    assert fold["flavour"] == "project" and fold["model_config"]["variant"] == "tiny"
    scores = fold["results"]["federated"]

    out_md = tmp_path / "table1.md"
    assert main(["table1", str(msa), str(unet), "--out", str(out_md)]) == 0
    printed = capsys.readouterr().out
    text = out_md.read_text()
    assert text in printed
    assert "| FedU-Net | " in text and "| FedMSA-tiny (-PT) | " in text and "| MSA-tiny (-PT, centralised) | " in text
    assert text.index("| FedU-Net |") < text.index("| FedMSA-tiny (-PT) |")
    assert f"| FedMSA-tiny (-PT) | {scores['dice']:.3f} | {scores['iou']:.3f} |" in text.split("paper code's scoring rule")[0]
    assert f"| FedMSA-tiny (-PT) | {scores['dice_reference']:.3f} | {scores['iou_reference']:.3f} |" in text
    assert "not yet held out: b" in text
    lines = list(csv.DictReader((tmp_path / "table1.csv").open()))
    mine = next(r for r in lines if r["model"] == "FedMSA-tiny (-PT)" and r["held_out_site"] == "a" and r["scoring"] == "honest")
    assert float(mine["dice"]) == pytest.approx(scores["dice"], abs=1e-6) and mine["rounds"] == "1"
