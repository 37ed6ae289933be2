"""The federation under faults, in FLARE's simulator (tiny model, synthetic sites): slow sites are averaged,
failing sites are named and bounded in time, poisoned updates never reach the global or the best model,
robust aggregation bounds a scaled update, and a stopped run continues from its last saved model.

Scenarios that need the same server settings share one federation, each on its own sites (apps): a module
fixture runs it once and the tests read what they need from it (tests/README.md, "Shared federations"). Their
tests carry one xdist_group, so pytest-xdist runs them in one worker and the federation starts once."""

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfms.cli import main
from fedfms.flare.jobs import resume_settings
from fedfms.flare.fed_job import render_job
from fedfms.run_record import read_run_record
from fedfms.flare.simulate import run_simulation, server_job_dir
from fedfms.flare.update_check import expected_travel_spec

from test_simulator import load_global, make_sites, write_job

pytestmark = pytest.mark.integration
TINY_MSA = render_job("fedmsa_tiny")["app/config/config_fed_client.json"]["executors"][0]["executor"]["args"]["model_config"]


def sent(out: Path, site: str, rnd: int) -> tuple[dict, dict]:
    return dict(np.load(out / f"{site}_r{rnd}.npz")), json.loads((out / f"{site}_r{rnd}.json").read_text())


def fedavg(results: list[tuple[dict, dict]]) -> dict:
    n = [meta["num_samples"] for _, meta in results]
    return {k: sum(w[k].astype(np.float64) * nk for (w, _), nk in zip(results, n)) / sum(n) for k in results[0][0]}


def assert_close(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def run_seconds(record: dict) -> float:
    """Seconds from the job's start to its end, by the run record's own timestamps."""
    started, ended = (datetime.strptime(record[k], "%Y-%m-%dT%H:%M:%S") for k in ("started", "ended"))
    return (ended - started).total_seconds()


def no_progress_bound(workspace: Path) -> float:
    """How long the job the simulator ran waits for a site it hears nothing from (the federation monitor's
    no_progress_timeout, from the server's deployed copy of the job; the liveness default when the job sets none).
    Rounds have no speed-derived timeout any more: this is the only wait a stopped job could have sat out."""
    from fedfms.flare.liveness import DEFAULT_NO_PROGRESS_S

    for config in server_job_dir(workspace).glob("*/config/config_fed_server.json"):
        for component in json.loads(config.read_text())["components"]:
            if component.get("id") == "federation_monitor":
                return float(component.get("args", {}).get("no_progress_timeout", DEFAULT_NO_PROGRESS_S))
    raise AssertionError(f"{server_job_dir(workspace)}: no federation_monitor")


def recording(out: Path, sites: list[str], **extra) -> dict:
    return {"sites": sites, "executor": "sim_support.RecordingExecutor", "args": {"out_dir": str(out)},
            "filters": [{"path": "sim_support.RecordingFilter", "args": {"out_dir": str(out)}}], **extra}


SIXTEEN = [f"site-{i:02d}" for i in range(1, 17)]
SLOW_SITE, SLOW_SECONDS = "site-16", 12


@pytest.fixture(scope="module")
def sixteen_sites_one_slow(tmp_path_factory, federation_lock):
    """Sixteen sites, one of them answering 12 s after the others; exit code, workspace and recordings. All sixteen
    at once (threads=16), with no other simulated federation beside it (federation_lock(alone=True)); POC federations
    of other workers may run meanwhile. Planned at ~7 GB because the sites are forked from the fork server and share
    its pages (~4.5 GB measured); counted as plain processes (13 GB) they were refused in a CI run that had 14 GB
    free. The automatic placement, which makes sites take turns when memory is short, is tests/test_capacity.py's."""
    tmp = tmp_path_factory.mktemp("sixteen")
    data = make_sites(tmp / "data", {s: 1 + i % 3 for i, s in enumerate(SIXTEEN)})
    out = tmp / "rec"
    slow = recording(out, [SLOW_SITE])
    slow["filters"] = slow["filters"] + [{"path": "sim_support.SlowFilter", "args": {"seconds": SLOW_SECONDS}}]
    job = write_job(tmp / "job", "fedmsa_tiny", {"app": recording(out, SIXTEEN[:-1]), "app_slow": slow})
    with federation_lock(alone=True):
        rc = run_simulation(job, tmp / "ws", SIXTEEN, data_root=data, threads=len(SIXTEEN))
    return rc, tmp / "ws", out


@pytest.mark.federation_alone
@pytest.mark.xdist_group("faults_sixteen_sites")
def test_a_slow_site_is_averaged_not_dropped(sixteen_sites_one_slow):
    # site-16 answers 12 s after the others: FLARE's former 10 s wait after min_clients dropped it from FedAvg
    rc, ws, out = sixteen_sites_one_slow
    assert rc == 0

    expected = fedavg([sent(out, s, 0) for s in SIXTEEN])
    assert_close(load_global(ws), expected)
    record = read_run_record(server_job_dir(ws))
    assert record["status"] == "completed" and SLOW_SITE in record["rounds"][0]["accepted"]
    assert record["rounds"][0]["seconds"] >= SLOW_SECONDS  # a lower bound: it holds on any machine, however busy


def test_a_site_that_cannot_start_stops_the_job_quickly_with_its_reason(tmp_path):
    data = make_sites(tmp_path / "data", {"site-1": 2})
    (data / "site-2").mkdir()
    (data / "site-2" / "manifest.json").write_text("{not json")
    cmd = [sys.executable, "-m", "fedfms.cli", "simulate", str(Path(__file__).parents[2] / "jobs" / "fedmsa_tiny"),
           "--workspace", str(tmp_path / "ws"), "--clients", "site-1,site-2", "--data-root", str(data), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "site-2" in errors[0] and "manifest.json" in errors[0] and "not valid JSON" in errors[0]
    record = read_run_record(server_job_dir(tmp_path / "ws"))
    assert record["status"] == "failed" and "site-2 cannot run this job" in record["reason"]
    # quickly: the server stopped when site-2 reported, instead of waiting for its result until the liveness bound
    # (the record's clock, from the job's start: how busy the machine is does not enter)
    bound = no_progress_bound(tmp_path / "ws")
    assert run_seconds(record) < bound, (run_seconds(record), bound)


GOOD, FAILING = ["site-1", "site-2"], "site-3"
POISONERS = {"site-4": "scale_count", "site-5": "huge_count", "site-6": "string_dtype", "site-7": "nan_dice"}


@pytest.fixture(scope="module")
def failing_and_poisoned(tmp_path_factory, federation_lock):
    """Two good sites, one whose training fails every round and four malicious ones, 2 rounds, min_sites=2."""
    tmp = tmp_path_factory.mktemp("gaps")
    sites = [*GOOD, FAILING, *POISONERS]
    data = make_sites(tmp / "data", {"site-1": 2, "site-2": 3, **{s: 2 for s in sites[2:]}})
    out = tmp / "rec"

    def poisoner(site, kind):  # a result filter after the project's own: what a malicious site can send
        return {"sites": [site], "filters": [{"path": "sim_support.PoisonFilter", "args": {"kind": kind}}]}

    job = write_job(tmp / "job", "fedmsa_tiny", {
        "app_good": recording(out, GOOD),
        "app_broken": {"sites": [FAILING], "executor": "sim_support.FailingExecutor", "args": {"from_round": 0}},
        "app_scale_count": poisoner("site-4", "scale_count"),  # weights x1000, sample count 1e9
        "app_huge_count": poisoner("site-5", "huge_count"),  # 1e18: overflows a float32 sum
        "app_string": poisoner("site-6", "string_dtype"),  # right shape, string dtype
        "app_nan_dice": poisoner("site-7", "nan_dice"),  # NaN weights while claiming Dice 1.0
    }, num_rounds=2, min_sites=2)
    with federation_lock():
        rc = run_simulation(job, tmp / "ws", sites, data_root=data)
    return rc, tmp / "ws", out


@pytest.mark.xdist_group("faults_failing_and_poisoned")
def test_a_site_failing_every_round_is_named_and_the_run_is_not_a_plain_success(failing_and_poisoned, capsys):
    rc, ws, out = failing_and_poisoned
    assert rc == 3

    assert_close(load_global(ws), fedavg([sent(out, s, 1) for s in GOOD]))
    record = read_run_record(server_job_dir(ws))
    assert record["status"] == "completed_with_gaps"
    assert record["sites"][FAILING]["contributed"] == []
    assert "simulated failure in round 0" in record["sites"][FAILING]["missed"]["0"]
    assert [r["status"] for r in record["rounds"]] == ["degraded", "degraded"]
    # fedfms report says so too, with a non-zero exit
    capsys.readouterr()
    code = main(["report", str(ws)])
    report = capsys.readouterr()
    assert code == 3, report.err
    assert FAILING in report.out and "never contributed" in report.out


def test_a_round_without_enough_sites_stops_the_run(tmp_path):
    data = make_sites(tmp_path / "data", {"site-1": 2, "site-2": 2})
    job = write_job(tmp_path / "job", "fedmsa_tiny", {
        "app": {"sites": ["site-1", "site-2"], "executor": "sim_support.FailingExecutor", "args": {"from_round": 1}},
    }, num_rounds=5)
    assert run_simulation(job, tmp_path / "ws", ["site-1", "site-2"], data_root=data) == 1
    record = read_run_record(server_job_dir(tmp_path / "ws"))
    # it stopped at round 1 rather than waiting out the liveness bound (the record's clock, as above)
    assert run_seconds(record) < no_progress_bound(tmp_path / "ws"), (run_seconds(record), no_progress_bound(tmp_path / "ws"))
    assert record["status"] == "failed" and "round 1: 0 accepted contribution(s), fewer than min_sites=2" in record["reason"]
    assert record["persisted_round"] == 0 and len([r for r in record["rounds"] if r["seconds"] is not None]) == 1


@pytest.mark.xdist_group("faults_failing_and_poisoned")
def test_poisoned_updates_never_reach_the_global_or_the_best_model(failing_and_poisoned):
    rc, ws, out = failing_and_poisoned
    assert rc == 3

    global_model = load_global(ws)
    assert set(global_model) == set(expected_travel_spec(TINY_MSA))  # nothing lost (head.bias included)
    assert_close(global_model, fedavg([sent(out, s, 1) for s in GOOD]))
    record = read_run_record(server_job_dir(ws))
    reasons = {s: record["sites"][s]["missed"]["0"] for s in POISONERS}
    assert "max_samples" in reasons["site-4"] and "max_samples" in reasons["site-5"]
    assert "dtype" in reasons["site-6"] and "NaN" in reasons["site-7"]
    assert all(record["sites"][s]["contributed"] == [] for s in POISONERS)
    # the best model was chosen from the accepted sites' metrics only: round 1's validation of the round-0 model
    good = [sent(out, s, 1)[1] for s in GOOD]
    expected_metric = sum(m["initial_metrics"]["val_dice"] * m["num_samples"] for m in good) / sum(m["num_samples"] for m in good)
    assert record["best"]["round"] == 1 and record["best"]["metric"] == pytest.approx(expected_metric)
    assert record["best"]["metric"] < 1.0
    best = torch.load(server_job_dir(ws) / "app_server" / "best_FL_global_model.pt", weights_only=False)
    assert_close({k: np.asarray(v) for k, v in best["model"].items()}, fedavg([sent(out, s, 0) for s in GOOD]))


def test_robust_median_bounds_a_scaled_update(tmp_path):
    data = make_sites(tmp_path / "data", {"site-1": 2, "site-2": 2, "site-3": 2})
    out = tmp_path / "rec"
    job = write_job(tmp_path / "job", "fedmsa_tiny", {
        "app_good": recording(out, ["site-1", "site-2"]),
        # honest sample count, weights x1000: passes every check; only the aggregation rule can bound it
        "app_scaled": {"sites": ["site-3"], "filters": [{"path": "sim_support.PoisonFilter",
                                                         "args": {"kind": "scale", "out_dir": str(out / "poison")}}]},
    }, aggregation="median")

    assert run_simulation(job, tmp_path / "ws", ["site-1", "site-2", "site-3"], data_root=data) == 0

    updates = [sent(out, s, 0)[0] for s in ("site-1", "site-2")] + [dict(np.load(out / "poison" / "site-3_r0.npz"))]
    expected = {k: np.median(np.stack([u[k].astype(np.float64) for u in updates]), axis=0) for k in updates[0]}
    global_model = load_global(tmp_path / "ws")
    assert_close(global_model, expected)
    honest = [u for u in updates[:2]]
    for key in expected:  # the median stays inside the honest sites' range, coordinate by coordinate
        lo, hi = np.minimum(honest[0][key], honest[1][key]), np.maximum(honest[0][key], honest[1][key])
        assert np.all(global_model[key] >= lo - 1e-6) and np.all(global_model[key] <= hi + 1e-6), key


def test_a_stopped_run_continues_from_its_last_saved_model(tmp_path):
    data = make_sites(tmp_path / "data", {"site-1": 2, "site-2": 2})
    out1, out2 = tmp_path / "rec1", tmp_path / "rec2"
    # site-2 breaks in round 2 of 4; on_missing_site=stop ends the run there (as a server crash would)
    job1 = write_job(tmp_path / "job1", "fedmsa_tiny", {
        "app_1": recording(out1, ["site-1"]),
        "app_2": recording(out1, ["site-2"], executor="sim_support.FailingExecutor",
                           args={"from_round": 2, "out_dir": str(out1)}),
    }, num_rounds=4, on_missing_site="stop")
    assert run_simulation(job1, tmp_path / "ws1", ["site-1", "site-2"], data_root=data) == 1
    run1 = server_job_dir(tmp_path / "ws1")
    assert read_run_record(run1)["persisted_round"] == 1

    resume = resume_settings(run1)
    assert resume["start_round"] == 2 and resume["site_samples"] == {"site-1": sent(out1, "site-1", 0)[1]["num_samples"],
                                                                      "site-2": sent(out1, "site-2", 0)[1]["num_samples"]}
    job2 = write_job(tmp_path / "job2", "fedmsa_tiny", {"app": recording(out2, ["site-1", "site-2"])}, num_rounds=4,
                     on_missing_site="stop", **resume)
    assert run_simulation(job2, tmp_path / "ws2", ["site-1", "site-2"], data_root=data) == 0

    # round 2 of the continued run starts from the model run 1 saved after round 1
    saved = torch.load(run1 / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    from sim_support import weights_digest

    assert json.loads((out2 / "site-1_in_r2.json").read_text()) == weights_digest({k: np.asarray(v) for k, v in saved.items()})
    assert not (out2 / "site-1_in_r0.json").exists() and not (out2 / "site-1_in_r1.json").exists()
    record = read_run_record(server_job_dir(tmp_path / "ws2"))
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2, 3] and record["status"] == "completed"
    assert record["resumed_from"] == str((run1 / "fedfms_run.json").resolve())
    assert_close(load_global(tmp_path / "ws2"), fedavg([sent(out2, s, 3) for s in ("site-1", "site-2")]))
    # the learning curve goes on at round 2
    from fedfms.reporting.run_report import read_curves

    curves = read_curves(server_job_dir(tmp_path / "ws2"))["site-1"]
    steps = [step for tag, points in curves.items() if tag.endswith("train_loss") for step, _ in points]
    assert sorted(steps) == [2, 3]


@pytest.mark.federation_alone
@pytest.mark.xdist_group("faults_sixteen_sites")
def test_sixteen_sites_are_all_averaged_every_round(sixteen_sites_one_slow):
    # as many sites at once as fit in this machine's memory, the rest in turn; every one in every round's average
    rc, ws, out = sixteen_sites_one_slow
    assert rc == 0
    assert_close(load_global(ws), fedavg([sent(out, s, 0) for s in SIXTEEN]))
    record = read_run_record(server_job_dir(ws))
    assert record["status"] == "completed" and sorted(record["rounds"][0]["accepted"]) == SIXTEEN


UPDATE_SITES = {"weight_diff": ["site-1", "site-2"], "percentile": ["site-3", "site-4"]}


@pytest.fixture(scope="module")
def weight_diff_and_privacy(tmp_path_factory, federation_lock):
    """Sites sending their change to the global model: two plainly, two through FLARE's percentile privacy
    filter (50th percentile), and one NaN update with a claimed Dice of 1.0."""
    tmp = tmp_path_factory.mktemp("updates")
    data = make_sites(tmp / "data", {"site-1": 2, "site-2": 3, "site-3": 2, "site-4": 3, "site-5": 2})
    out = tmp / "rec"
    job = write_job(tmp / "job", "fedmsa_tiny", {
        "app_diff": recording(out, UPDATE_SITES["weight_diff"], without=["PercentilePrivacy"]),
        "app_private": recording(out, UPDATE_SITES["percentile"]),
        "app_nan": {"sites": ["site-5"], "filters": [{"path": "sim_support.PoisonFilter", "args": {"kind": "nan_dice"}}]},
    }, privacy="percentile", privacy_args={"percentile": 50})  # privacy: the job's updates are weight_diff
    with federation_lock():
        rc = run_simulation(job, tmp / "ws", [f"site-{i}" for i in range(1, 6)], data_root=data)
    return rc, tmp / "ws", out


@pytest.mark.xdist_group("faults_weight_diff_and_privacy")
@pytest.mark.parametrize("kind", ["weight_diff", "percentile"])
def test_weight_diff_and_differential_privacy_updates_are_averaged_and_still_checked(weight_diff_and_privacy, kind):
    rc, ws, out = weight_diff_and_privacy
    assert rc == 3

    start = dict(np.load(out / "site-1_in_r0.npz"))
    diffs = {s: sent(out, s, 0) for sites in UPDATE_SITES.values() for s in sites}
    zeros = {s: (np.concatenate([v.ravel() for v in d.values()]) == 0).mean() for s, (d, _) in diffs.items()}
    if kind == "percentile":  # what left the sites is sparse: the percentile filter zeroed the small changes
        assert all(zeros[s] > 0.3 for s in UPDATE_SITES["percentile"]), zeros
    else:  # the plain difference: no filter zeroed it
        assert all(zeros[s] < 0.3 for s in UPDATE_SITES["weight_diff"]), zeros
    update = fedavg(list(diffs.values()))
    assert_close(load_global(ws), {k: start[k].astype(np.float64) + update[k] for k in update})
    record = read_run_record(server_job_dir(ws))
    assert all(record["sites"][s]["contributed"] == [0] for s in UPDATE_SITES[kind])
    assert "NaN" in record["sites"]["site-5"]["missed"]["0"] and record["sites"]["site-5"]["contributed"] == []
