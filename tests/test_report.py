"""Report helpers that need no FLARE run (the simulator tests cover the rest)."""

import json

import pytest

from fedfms.errors import DataError
from fedfms.reporting.run_report import format_table
from fedfms.run_record import best_model_note, find_run_dir


def test_find_run_dir_takes_the_shallowest_result(tmp_path):
    deep = tmp_path / "download" / "job1" / "workspace" / "cross_site_val"
    deep.mkdir(parents=True)
    (deep / "cross_val_results.json").write_text(json.dumps({}))
    assert find_run_dir(tmp_path / "download") == deep.parent
    with pytest.raises(DataError, match="no cross_site_val"):
        find_run_dir(tmp_path / "download" / "job1" / "workspace" / "cross_site_val")
    with pytest.raises(DataError, match="not a folder"):
        find_run_dir(tmp_path / "missing")


def test_format_table_aligns_and_marks_missing_values():
    text = format_table([{"site": "HK", "dice": 0.81234, "iou": None, "num_samples": 12}])
    header, rule, row = text.splitlines()
    assert header.split()[:3] == ["site", "Dice", "r0"]
    assert "0.812" in row and "-" in row and row.endswith("12")
    assert len(rule) == len(header)


def _run(tmp_path, rounds, best, start_round=0):
    run = tmp_path / "server" / "simulate_job"
    run.mkdir(parents=True)
    record = {"status": "completed", "expected_sites": ["a", "b"], "start_round": start_round, "best": best,
              "rounds": [{"round": start_round + i, "seconds": 1.0, "updated_model": True, "accepted": {"a": 10, "b": 30},
                          "val_dice": dict(zip("ab", dice)), "failed": {}, "missing": []} for i, dice in enumerate(rounds)]}
    (run / "fedfms_run.json").write_text(json.dumps(record))
    return run


def test_best_model_note_says_how_trained_the_best_model_is(tmp_path):

    run = _run(tmp_path, [(0.2, 0.2), (0.5, 0.7), (0.6, 0.6)], {"round": 1, "metric": 0.65})
    lines = best_model_note(run)
    assert lines == ["best global model: the one after 1 of 3 round(s) of training (sites' validation Dice 0.650); "
                     "the final global model is the one after 3"]


def test_best_model_note_of_a_resumed_run_counts_the_rounds_of_both_runs(tmp_path):

    # stopped after round 6, resumed from round 7 to round 9; the best model (scored in round 5) came from the first
    run = _run(tmp_path, [(0.2, 0.2)] * 10, {"round": 5, "metric": 0.65})
    record = json.loads((run / "fedfms_run.json").read_text())
    record["start_round"] = 7
    (run / "fedfms_run.json").write_text(json.dumps(record))
    assert best_model_note(run)[0].startswith("best global model: the one after 5 of 10 round(s) of training")


def test_best_model_note_says_when_the_untrained_start_beat_every_trained_model(tmp_path):

    # round 0 scores the initial model: 0.48 (weighted 10:30) beats both trained ones
    run = _run(tmp_path, [(0.42, 0.5), (0.3, 0.4), (0.2, 0.1)], {"round": 1, "metric": 0.375})
    lines = best_model_note(run)
    assert len(lines) == 2 and "untrained initial model scored 0.480" in lines[1] and "best 0.375" in lines[1]
    assert "not the initial model" in lines[1]


def test_best_model_note_for_a_run_without_a_best_model(tmp_path):

    run = _run(tmp_path, [(0.4, 0.4)], None)
    assert best_model_note(run)[0].startswith("best global model: none chosen")


def test_pick_samples_is_even_and_stable():
    from fedfms.reporting.run_report import pick_samples

    assert pick_samples([5, 6, 7, 8, 9], 2) == [5, 9]
    assert pick_samples([5, 6, 7, 8, 9], 3) == [5, 7, 9]
    assert pick_samples([1], 2) == [1] and pick_samples([4, 2], 1) == [4]


def test_run_configs_come_from_the_job_or_the_workspace_and_are_named_when_missing(tmp_path):
    from fedfms.reporting.run_report import run_configs

    run = _run(tmp_path, [(0.4, 0.4)], None)
    with pytest.raises(DataError, match="pass --job"):
        run_configs(run)
    config = tmp_path / "a" / "simulate_job" / "app_a" / "config" / "config_fed_client.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"executors": [{"executor": {"args": {"model_config": {"variant": "tiny"},
                                                                        "train_config": {"val_fraction": 0.3}}}}]}))
    assert run_configs(run) == ({"variant": "tiny"}, {"val_fraction": 0.3})


def test_a_run_left_running_by_a_killed_server_is_closed_truthfully(tmp_path):
    from fedfms.deploy.site_setup import close_run_record
    from fedfms.run_record import exit_code, summarize

    run = _run(tmp_path, [(0.2, 0.2)] * 7, None)
    record = json.loads((run / "fedfms_run.json").read_text())
    record.update(status="running", last_round=29, persisted_round=6)
    record["rounds"].append({"round": 7, "status": "running", "seconds": None, "accepted": {"a": 10}, "failed": {},
                             "missing": []})
    (run / "fedfms_run.json").write_text(json.dumps(record))
    close_run_record(run)
    closed = json.loads((run / "fedfms_run.json").read_text())
    assert closed["status"] == "failed" and exit_code(closed) == 1
    assert closed["rounds"][-1]["status"] == "interrupted" and closed["sites"]["b"]["missed"] == {}
    first = summarize(closed).splitlines()[0]
    assert first.startswith("federation failed: 7 of 30 round(s) finished; the server stopped during the job")
    assert "continues it from round 7" in first
