"""Both scoring rules through the evaluation commands: `fedfms evaluate`, the LOSO table and CSV."""

from __future__ import annotations

import json

import pytest
import torch

from fedfms.cli import main
from fedfms.data.synthetic import make_disc_site
from fedfms.evaluation import collect, evaluate_sites, format_loso_table, format_site_rows
from fedfms.evaluation.results import FOLD_FILE, write_csv
from fedfms.evaluation.scoring import scoring_keys
from fedfms.models import ModelConfig, build_model, travel_state_dict

MODEL = ModelConfig("tiny", "fedmsa", num_classes=1, pretrained=False, init_seed=0)


@pytest.fixture(scope="module")
def site_and_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    site = make_disc_site(root / "s", site="s", num_volumes=2, slices_per_volume=4, seed=5)
    weights = root / "w.pt"
    torch.save({"model": travel_state_dict(build_model(MODEL), MODEL.mode)}, weights)
    return site, weights


def test_evaluate_rows_carry_both_rules_and_tables_label_them(site_and_weights, tmp_path, capsys):
    site, weights = site_and_weights
    row = evaluate_sites(MODEL, weights, [site])[0]
    for key in ("dice", "iou", "dice_reference", "iou_reference"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["reference_on"] == "logits" and row["reference_thresholds"] == [0.1, 0.3, 0.5, 0.7, 0.9]

    honest = format_site_rows([row]).splitlines()
    assert honest[0].split() == ["site", "Dice", "IoU", "3D", "Dice", "3D", "IoU", "n"] and len(honest) == 3
    reference = format_site_rows([row], "reference").splitlines()
    assert reference[0].split() == ["site", "ref", "Dice", "ref", "IoU", "n"]
    assert reference[2].split()[1:3] == [f"{row['dice_reference']:.3f}", f"{row['iou_reference']:.3f}"]
    assert reference[-1].startswith("ref Dice, ref IoU: the paper code's rule: per 2D slice")
    both = format_site_rows([row, row], "both")
    assert "ref Dice" in both and "3D Dice" in both and "Dice, IoU: this project's rule" in both

    assert main(["evaluate", str(site), "--weights", str(weights), "--job", "fedmsa_tiny", "--scoring", "reference",
                 "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["site", "ref", "Dice", "ref", "IoU", "n"]
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["scoring"] == "reference" and saved["sites"][0]["dice_reference"] == pytest.approx(row["dice_reference"])
    assert saved["sites"][0]["dice"] == pytest.approx(row["dice"])  # both rules are always in the JSON
    with pytest.raises(SystemExit) as exit_info:  # argparse: the choices are listed
        main(["evaluate", str(site), "--weights", str(weights), "--job", "fedmsa_tiny", "--scoring", "paper"])
    assert exit_info.value.code == 2 and "choose from 'honest', 'reference', 'both'" in capsys.readouterr().err


def _fold(workspace, holdout, signature, dice, ref):
    (workspace / holdout).mkdir(parents=True)
    scores = {"dice": dice, "iou": dice / 2, "volume_dice": dice, "volume_iou": dice, "dice_reference": ref,
              "iou_reference": ref - 0.1, "num_samples": 10, "classes": ["disc", "cup"], "dice_per_class": [dice, dice],
              "iou_per_class": [dice / 2, dice / 2], "dice_reference_per_class": [ref + 0.05, ref - 0.05],
              "iou_reference_per_class": [ref - 0.1, ref - 0.1], "reference_on": "logits"}
    record = {"signature": signature, "holdout": holdout, "status": "done", "results": {"federated": scores}}
    (workspace / holdout / FOLD_FILE).write_text(json.dumps(record))


def test_loso_table_and_csv_under_each_rule(tmp_path):
    sig = {"job": "fedmsa_tiny", "sites": ["a", "b"], "rounds": 2, "train_overrides": {}, "model_overrides": {}}
    _fold(tmp_path, "a", sig, dice=0.4, ref=0.7)
    _fold(tmp_path, "b", sig, dice=0.6, ref=0.9)
    rows, report = collect(tmp_path, sig)
    assert rows[0]["dice_reference"] == pytest.approx(0.8) and rows[0]["iou_reference"] == pytest.approx(0.7)
    assert rows[0]["dice_reference_per_class"] == pytest.approx([0.85, 0.75])
    assert "the paper code's rule" in report["metrics_reference"]

    assert scoring_keys("reference") == ("dice_reference", "iou_reference")
    lines = write_csv(rows, tmp_path / "ref.csv", "reference").read_text().splitlines()
    assert lines[0] == ("method,held_out_site,dice_reference,iou_reference,dice_reference_disc,iou_reference_disc,"
                        "dice_reference_cup,iou_reference_cup,num_samples")
    assert lines[3] == "federated,average,0.800000,0.700000,0.850000,0.700000,0.750000,0.700000,20"
    both = write_csv(rows, tmp_path / "both.csv", "both").read_text().splitlines()[0].split(",")
    assert both[2:8] == ["dice", "iou", "volume_dice", "volume_iou", "dice_reference", "iou_reference"]

    table = format_loso_table(rows, report["held_out"], "reference").splitlines()
    assert table[0] == "the paper code's rule (ref Dice, ref IoU)"
    assert table[4].split()[-6:] == ["0.700", "0.600", "0.900", "0.800", "0.800", "0.700"]
    assert table[-1].startswith("ref Dice, ref IoU: the paper code's rule")
    two = format_loso_table(rows, report["held_out"], "both")
    assert two.count("federated, final global model") == 2 and "0.400  0.200" in two
