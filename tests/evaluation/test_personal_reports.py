"""Reading back a personalised federation, FLARE-free: the per-site comparison (global vs personalised vs alone)
with its flags, the checks on a site's answer, which model a held-out site gets, and the LOSO and Table 1 views."""

from __future__ import annotations

import json

import pytest

from fedfms.errors import ConfigError
from fedfms.evaluation.loso import check_settings
from fedfms.evaluation.personal import (comparison_rows, format_comparison, format_record, held_out_model, personal_gaps,
                                        site_entry_problems)
from fedfms.evaluation.results import FOLD_FILE, RESULTS_JSON, collect
from fedfms.reporting.tables import build_table1, format_table1

TINY = {"variant": "tiny", "mode": "fedmsa", "num_classes": 1, "pretrained": False}


def test_the_comparison_flags_a_site_below_the_better_of_global_and_alone_by_more_than_the_noise():
    rows = comparison_rows({"a": {"global": 0.80, "personal": 0.79, "alone": 0.70},   # 0.01 below global: within noise
                            "b": {"global": 0.70, "personal": 0.75, "alone": 0.78},   # 0.03 below alone: flagged
                            "c": {"global": 0.60, "personal": 0.70, "alone": None}})  # no alone: against global only
    by_site = {r["site"]: r for r in rows}
    assert by_site["a"]["gap"] == pytest.approx(-0.01) and not by_site["a"]["below"]
    assert by_site["b"]["gap"] == pytest.approx(-0.03) and by_site["b"]["below"]
    assert by_site["c"]["gap"] == pytest.approx(0.10) and not by_site["c"]["below"]
    assert by_site["mean"]["personal"] == pytest.approx((0.79 + 0.75 + 0.70) / 3)
    text = format_comparison(rows)
    assert "below by 0.030 (> 0.02)" in text.splitlines()[3] and "below" not in text.splitlines()[2]
    assert not any(line != line.rstrip() for line in text.splitlines())
    # nothing flagged: no flag column
    assert "flag" not in format_comparison(comparison_rows({"a": {"global": 0.8, "personal": 0.8, "alone": 0.7}}))


def test_a_sites_answer_may_hold_scores_only():
    good = {"global": {"dice": 0.7, "num_samples": 4}, "personal": {"dice": 0.8, "classes": ["x"], "dice_per_class": [0.8]},
            "files": {"global": "/site/fedfms_personal/global_model.pt"}}
    assert site_entry_problems(good) == []
    assert "unexpected field(s) ['head.weight']" in site_entry_problems({**good, "head.weight": [[0.1]]})[0]
    assert any("personal scores hold unexpected field(s) ['weights']" in p
               for p in site_entry_problems({**good, "personal": {"dice": 0.8, "weights": [1.0]}}))
    assert any("global dice is 1.5" in p for p in site_entry_problems({**good, "global": {"dice": 1.5}}))
    assert site_entry_problems({"global": {"dice": 0.5}}) == ["no personal scores"]
    assert site_entry_problems("x") == ["answer is a str, expected a dict of scores"]


def test_the_record_names_every_site_without_its_personalised_model():
    record = {"personalise": "norm,finetune:5", "alone_epochs": 0,
              "sites": {"s1": {"status": "ok", "global": {"dice": 0.7}, "personal": {"dice": 0.72}},
                        "s2": {"status": "failed", "reason": "task personalise failed at the site: RuntimeError: x"}}}
    assert personal_gaps(record) == ["s2: no personalised model (task personalise failed at the site: RuntimeError: x)"]
    text = format_record(record)
    assert "personalisation norm,finetune:5: each site keeps its own normalisation layers" in text
    assert "global: the final global model's shared part with the site's own norm part" in text
    assert "alone: not trained (add 'alone' to --personalise)" in text
    assert "warning: s2: no personalised model" in text


def test_which_model_a_held_out_site_gets():
    assert held_out_model(TINY) == "the final global model"
    assert "initial normalisation layers" in held_out_model({**TINY, "local_parts": ["norm"]})
    for parts in (["head"], ["norm", "decoder"]):
        with pytest.raises(ConfigError, match="has none of its own"):
            held_out_model({**TINY, "local_parts": parts})
    # loso refuses such a job before any fold runs
    with pytest.raises(ConfigError, match="leave-one-site-out needs a job whose held-out site can use the global model"):
        check_settings({"model": {**TINY, "local_parts": ["head"]}, "train": {}}, ["disc"])


def _personal_workspace(root, sites, folds):
    """A personalised LOSO workspace as `fedfms loso` leaves it: fold records with the training sites' scores."""
    ws = root / "loso_personal"
    signature = {"job": "fedmsa_personal", "sites": sites, "rounds": 10, "train_overrides": {}, "model_overrides": {}}
    for holdout, personal in folds.items():
        (ws / holdout).mkdir(parents=True)
        scores = {"dice": 0.6, "iou": 0.5, "classes": ["disc"], "num_samples": 8}
        record = {"signature": signature, "holdout": holdout, "status": "done", "results": {"federated": scores},
                  "model_config": {**TINY, "local_parts": ["norm"]}, "train_config": {},
                  "personalise": "norm,finetune:5,alone", "held_out_model": held_out_model({**TINY, "local_parts": ["norm"]}),
                  "personal": personal, "personal_gaps": []}
        (ws / holdout / FOLD_FILE).write_text(json.dumps(record))
    rows, report = collect(ws, signature)
    (ws / RESULTS_JSON).write_text(json.dumps(report))
    return ws, report


def test_loso_averages_each_training_sites_comparison_and_table1_shows_it(tmp_path):
    folds = {"A": {"B": {"global": 0.70, "personal": 0.80, "alone": 0.75}, "C": {"global": 0.60, "personal": 0.62, "alone": 0.70}},
             "B": {"A": {"global": 0.80, "personal": 0.81, "alone": 0.60}, "C": {"global": 0.64, "personal": 0.66, "alone": 0.72}},
             "C": {"A": {"global": 0.82, "personal": 0.83, "alone": 0.60}, "B": {"global": 0.72, "personal": 0.78, "alone": 0.75}}}
    ws, report = _personal_workspace(tmp_path, ["A", "B", "C"], folds)
    assert report["personalise"] == "norm,finetune:5,alone" and "initial normalisation" in report["held_out_model"]
    assert report["personal"]["C"] == pytest.approx({"global": 0.62, "personal": 0.64, "alone": 0.71})
    assert report["personal"]["A"]["personal"] == pytest.approx(0.82)

    [table] = build_table1([ws])
    assert table.rows[0]["label"] == "FedMSA-tiny (-PT) (personalised: norm,finetune:5,alone)"
    text = format_table1([table], "honest")
    assert "### Personalisation at the training sites: FedMSA-tiny (-PT) (loso_personal), personalise norm,finetune:5,alone" in text
    assert "| C | 0.620 | 0.640 | 0.710 | -0.070 (below) |" in text  # 0.07 under its site-alone model
    assert "| A | 0.810 | 0.820 | 0.600 | +0.010 |" in text
    assert "each held-out site got the final global model's shared part with the model's initial normalisation layers" in text
