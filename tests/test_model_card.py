"""The model card: every number is the run record's and ``fedfms report``'s (compared here, computed from the run,
not typed in), privacy settings are read from the job the sites ran, and the limits the run record knows are said.

The demo's FedMSA run is the session fixture shared with the bundle tests; the other cases are run folders made
here (no FLARE run, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfms.cli import main
from fedfms.data.site_dataset import read_manifest
from fedfms.model_card import model_card
from fedfms.run_record import site_summary


@pytest.mark.integration
def test_card_numbers_are_the_run_records_and_fedfms_reports(demo_fedmsa_run, tmp_path, capsys):
    import nvflare

    workspace, sites = demo_fedmsa_run["workspace"], demo_fedmsa_run["sites"]
    rc = main(["report", str(workspace), "--json", str(tmp_path / "report.json"), "--card", str(tmp_path / "card"),
               "--data-root", str(sites)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    card = json.loads((tmp_path / "card" / "model_card.json").read_text())
    markdown = (tmp_path / "card" / "model_card.md").read_text()
    record = report["federation"]
    rows = {r["site"]: r for r in report["sites"]}
    final, best = card["scores"]["models"]["global_final"], card["scores"]["models"]["global_best"]
    assert sorted(final) == sorted(s for s in rows if s != "average") == record["expected_sites"]
    for site, row in rows.items():
        if site == "average":
            for key in ("dice", "iou", "volume_dice", "dice_reference"):
                assert card["scores"]["average"]["global_final"][key] == pytest.approx(row[key])
            assert card["scores"]["average"]["global_best"]["dice"] == pytest.approx(row["best_dice"])
            continue
        for key in ("dice", "iou", "volume_dice", "dice_reference", "num_samples"):
            assert final[site][key] == row[key], (site, key)
        assert (best[site]["dice"], best[site]["iou"]) == (row["best_dice"], row["best_iou"])
        assert final[site]["iou_reference"] is not None and final[site]["volume_iou"] is not None
        assert f"| {site} | {row['dice']:.3f} | {row['iou']:.3f} |" in markdown
        done, finished = row["rounds"].split("/")
        assert len(card["sites"][site]["contributed"]) == int(done)
        assert card["sites"][site]["train_samples"] == record["sites"][site]["samples"]
        assert card["sites"][site]["manifest"]["samples"] == len(read_manifest(sites / site).samples)
    assert card["run"]["rounds_finished"] == int(finished) == len(record["rounds"])
    assert [r["accepted"] for r in card["contributions"]] == [r["accepted"] for r in sorted(record["rounds"], key=lambda r: r["round"])]
    assert card["run"]["status"] == record["status"] == "completed" and card["run"]["best"] == record["best"]
    assert card["job"]["variant"] == "fedmsa_tiny" and card["job"]["flavour"] == "project" and card["job"]["mode"] == "fedmsa"
    assert card["job"]["train_config"]["epochs"] == 1 and card["job"]["num_rounds"] == 2
    assert card["privacy"]["update"] == "weights" and card["privacy"]["dp_filter"] is None and card["privacy"]["he"] is None
    assert card["privacy"]["transfer"] == "float32" and "frozen encoder never leaves" in card["privacy"]["travel_set"]
    assert card["versions"]["nvflare"] == nvflare.__version__
    assert any(line.startswith("best global model:") for line in card["limits"])


# ----------------------------------------------------------------------------------------------------------------
# run folders made here


def write_run(root: Path, job_files: dict, record: dict, cross: dict) -> Path:
    run = root / "server" / "simulate_job"
    (run / "app_server" / "config").mkdir(parents=True)
    for name in ("config_fed_client.json", "config_fed_server.json"):
        (run / "app_server" / "config" / name).write_text(json.dumps(job_files[f"app/config/{name}"]))
    (run / "meta.json").write_text(json.dumps(job_files["meta.json"]))
    (run / "fedfms_run.json").write_text(json.dumps(record))
    if cross:
        (run / "cross_site_val").mkdir()
        (run / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(cross))
    return run


def scores(dice: float) -> dict:
    return {"dice": dice, "iou": dice - 0.1, "volume_dice": dice + 0.01, "volume_iou": dice - 0.09,
            "dice_reference": dice - 0.05, "iou_reference": dice - 0.15, "num_samples": 7}


def test_a_run_with_gaps_privacy_filters_and_a_held_out_site(tmp_path, capsys):
    from fedfms.flare.fed_job import render_job

    files = render_job("fedmsa_tiny", sites=["a", "b"], num_rounds=2, privacy="percentile",
                       privacy_args={"percentile": 10, "gamma": 0.01}, transfer="float16")
    record = {"status": "completed_with_gaps", "expected_sites": ["a", "b"], "min_sites": 1, "on_missing_site": "continue",
              "start_round": 0, "num_rounds": 2, "last_round": 1, "best": None, "rounds": [
                  {"round": 0, "status": "ok", "seconds": 2.0, "updated_model": True, "accepted": {"a": 10, "b": 30},
                   "failed": {}, "missing": [], "val_dice": {"a": 0.2, "b": 0.3}},
                  {"round": 1, "status": "ok", "seconds": 2.0, "updated_model": True, "accepted": {"a": 10},
                   "failed": {"b": "simulated failure in round 1"}, "missing": [], "val_dice": {"a": 0.5}}]}
    record["sites"] = site_summary(record)  # as the federation monitor writes it
    fold = tmp_path / "loso" / "c"  # a leave-one-site-out fold: <fold>/simulator/server/simulate_job
    run = write_run(fold / "simulator", files, record, {"a": {"SRV_FL_global_model.pt": scores(0.8)}})
    (fold / "fold.json").write_text(json.dumps({"holdout": "c", "train_sites": ["a", "b"], "status": "done",
                                                "results": {"federated": scores(0.61)}}))

    assert main(["report", str(run), "--card", str(tmp_path / "card")]) == 3  # a site missed a round: not a success
    card = json.loads((tmp_path / "card" / "model_card.json").read_text())
    dp = card["privacy"]["dp_filter"]
    assert dp["name"] == "percentile" and {"percentile": 10, "gamma": 0.01}.items() <= dp["args"].items()
    assert card["privacy"]["update"] == "weight_diff" and card["privacy"]["transfer"] == "float16"
    assert card["sites"]["b"]["missed"] == {"1": "simulated failure in round 1"} and card["sites"]["b"]["contributed"] == [0]
    assert card["sites"]["a"]["train_samples"] == 10 and card["sites"]["a"]["manifest"] is None
    assert any("b: missed 1 round(s) (round 1): simulated failure" in line for line in card["limits"])
    assert any(line.startswith("federation completed_with_gaps") for line in card["limits"])
    assert "no cross-site scores for b" in card["limits"]
    assert card["heldout"]["site"] == "c" and card["heldout"]["models"]["federated"]["dice"] == 0.61
    assert card["scores"]["models"]["global_final"]["a"]["dice_reference"] == pytest.approx(0.75)
    md = (tmp_path / "card" / "model_card.md").read_text()
    assert "FLARE's `percentile` filter" in md and "## Held-out site" in md and "| c |" not in md
    assert "| 1 | ok | a (10) | b | True |" in md

    he = render_job("fedmsa_tiny", sites=["a", "b"], encryption="he")
    card = model_card(write_run(tmp_path / "he", he, {**record, "status": "completed"}, {}))
    assert card["privacy"]["he"]["encryption"].startswith("CKKS") and card["privacy"]["dp_filter"] is None
    assert "no cross-site evaluation" in " ".join(card["limits"]) and card["scores"]["models"] == {}
    assert card["heldout"] is None


def test_card_refusals_name_the_file(tmp_path, capsys):
    run = tmp_path / "server" / "simulate_job"
    run.mkdir(parents=True)
    (run / "fedfms_run.json").write_text(json.dumps({"status": "completed", "rounds": []}))
    assert main(["report", str(tmp_path), "--card", str(tmp_path / "card")]) == 2
    err = capsys.readouterr().err
    assert "no config_fed_client.json" in err and "--job" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "card").exists()
