"""End-to-end runs of the FedMSA/FedSAM jobs in FLARE's simulator (tiny model, synthetic sites).

Each run takes ~30-60 s on 2 cores; they check what the federation promises: sample-weighted FedAvg,
only the travel set leaves a site, the frozen encoder never moves, bad contributions are rejected."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfms.data.synthetic import make_disc_site
from fedfms.flare.fed_job import render_job
from fedfms.run_record import read_run_record
from fedfms.flare.simulate import run_simulation, server_job_dir
from fedfms.flare.update_check import expected_travel_spec
from fedfms.models import ModelConfig, build_model, travel_bytes
from fedfms.reporting.run_report import plot_report, site_table

SUPPORT = Path(__file__).with_name("sim_support.py")
pytestmark = pytest.mark.integration


def make_sites(root: Path, sizes: dict[str, int]) -> Path:
    for i, (site, volumes) in enumerate(sizes.items()):
        make_disc_site(root / site, site=site, num_volumes=volumes, slices_per_volume=3, seed=i)
    return root


# Local epochs per round in the federations these tests build (a job's "train" setting may say otherwise): what
# they check (the averages, the checks on what sites send, faults) holds for any amount of local training, and
# each site-round of the tiny variants' 20 epochs costs about 2 CPU-seconds. The tests that check learning keep
# their variant's epochs (test_demo, test_nnunet_simulator, the LOSO tests).
TEST_TRAIN = {"epochs": 2}


def write_job(job_dir: Path, variant: str, apps: dict[str, dict], num_rounds: int = 1, transfer: str = "float32",
              **settings) -> Path:
    """``apps``: app name -> {"sites": [...], "executor": class path, "args": extra executor args,
    "filters": extra result filters, "travel_filter": bool, "without": class names of the job's result filters
    this app leaves out}; ``settings``: job settings (fedfms.flare.jobs)."""
    sites = [s for app in apps.values() for s in app["sites"]]
    settings.setdefault("sites", sorted(sites))
    settings["train"] = {**TEST_TRAIN, **(settings.get("train") or {})}
    files = render_job(variant, num_rounds=num_rounds, transfer=transfer, **settings)
    meta = files["meta.json"]
    meta["deploy_map"] = {"app_server": ["server"], **{name: app["sites"] for name, app in apps.items()}}
    (job_dir).mkdir(parents=True)
    (job_dir / "meta.json").write_text(json.dumps(meta))
    server_app = job_dir / "app_server" / "config"
    server_app.mkdir(parents=True)
    (server_app / "config_fed_server.json").write_text(json.dumps(files["app/config/config_fed_server.json"]))
    for name, app in apps.items():
        client = json.loads(json.dumps(files["app/config/config_fed_client.json"]))
        executor = client["executors"][0]["executor"]
        executor["path"] = app.get("executor", executor["path"])
        executor["args"].update(app.get("args", {}))
        filters = client["task_result_filters"][0]["filters"]
        if not app.get("travel_filter", True):
            filters.clear()
        filters[:] = [f for f in filters if f["path"].rsplit(".", 1)[-1] not in app.get("without", [])]
        filters.extend(app.get("filters", []))
        if not filters:  # FLARE refuses an empty filter chain
            client["task_result_filters"] = []
        (job_dir / name / "config").mkdir(parents=True)
        (job_dir / name / "config" / "config_fed_client.json").write_text(json.dumps(client))
        (job_dir / name / "custom").mkdir()
        shutil.copy(SUPPORT, job_dir / name / "custom" / "sim_support.py")
    return job_dir


def load_global(workspace: Path) -> dict[str, np.ndarray]:
    saved = torch.load(server_job_dir(workspace) / "app_server" / "FL_global_model.pt", weights_only=False)
    return {k: np.asarray(v) for k, v in saved["model"].items()}


def recorded(out: Path, site: str, rnd: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    arrays = dict(np.load(out / f"{site}_r{rnd}.npz"))
    return arrays, json.loads((out / f"{site}_r{rnd}.json").read_text())


def fedavg_federation(tmp: Path, variant: str, transfer: str, flavour: str | None, num_rounds: int = 1,
                      **settings) -> tuple[int, Path, Path]:
    """Two sites of unequal sample counts, recording what they receive and send: (exit code, workspace, records)."""
    data = make_sites(tmp / "data", {"site-1": 3, "site-2": 6})  # unequal sample counts
    out = tmp / "recorded"
    recorder = {"path": "sim_support.RecordingFilter", "args": {"out_dir": str(out)}}
    job = write_job(tmp / "job", variant, {"app_sites": {
        "sites": ["site-1", "site-2"], "executor": "sim_support.RecordingExecutor",
        "args": {"out_dir": str(out)}, "filters": [recorder]}}, num_rounds=num_rounds, transfer=transfer,
        flavour=flavour, **settings)
    return run_simulation(job, tmp / "ws", ["site-1", "site-2"], data_root=data), tmp / "ws", out


@pytest.fixture(scope="module")
def fedmsa_tracked_by_mlflow(tmp_path_factory, federation_lock):
    """The FedMSA float32 federation, 2 rounds, tracked by MLflow as well (TensorBoard always): one run for
    the FedAvg test's first case and the MLflow test."""
    with federation_lock():
            return fedavg_federation(tmp_path_factory.mktemp("fedmsa_mlflow"), "fedmsa_tiny", "float32", None,
                                 num_rounds=2, tracking="mlflow")


SHARED = pytest.mark.xdist_group("simulator_fedmsa_mlflow")


@pytest.mark.parametrize("variant,transfer,flavour", [pytest.param("fedmsa_tiny", "float32", None, marks=SHARED),
                                                     ("fedsam_tiny", "float16", None),
                                                     ("fedmsa_tiny", "float32", "reference")])
def test_one_round_is_sample_weighted_fedavg_of_what_sites_sent(tmp_path, request, variant, transfer, flavour):
    if (variant, transfer, flavour) == ("fedmsa_tiny", "float32", None):
        rc, ws, out = request.getfixturevalue("fedmsa_tracked_by_mlflow")
    else:
        rc, ws, out = fedavg_federation(tmp_path, variant, transfer, flavour)
    assert rc == 0
    last = len(read_run_record(server_job_dir(ws))["rounds"]) - 1  # the global model is the last round's average

    sent = {s: recorded(out, s, last) for s in ("site-1", "site-2")}
    n = {s: sent[s][1]["num_samples"] for s in sent}
    assert n["site-1"] != n["site-2"] and min(n.values()) > 0
    # independent FedAvg: sum(n_k w_k) / sum(n_k), in float64
    expected = {k: sum(n[s] * sent[s][0][k].astype(np.float64) for s in sent) / sum(n.values()) for k in sent["site-1"][0]}
    global_model = load_global(ws)
    assert set(global_model) == set(expected)
    for key, value in expected.items():  # (float16 transfer: the server averages the restored float16 values)
        np.testing.assert_allclose(global_model[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        assert global_model[key].dtype == np.float32
    # and it is not simply one site's model
    key = next(k for k in expected if not np.allclose(sent["site-1"][0][k], sent["site-2"][0][k]))
    assert not np.allclose(global_model[key], sent["site-1"][0][key])

    client_cfg = render_job(variant, flavour=flavour)["app/config/config_fed_client.json"]
    model_cfg = client_cfg["executors"][0]["executor"]["args"]["model_config"]
    spec = expected_travel_spec(model_cfg)
    for site, (arrays, meta) in sent.items():
        assert set(arrays) == set(spec), f"{site} sent keys outside/short of the travel set"
        assert meta["nbytes"] == travel_bytes(spec, bytes_per_value=2 if transfer == "float16" else 4)
    if variant == "fedmsa_tiny":
        assert all(not k.startswith("image_encoder.") or "adapter" in k for k in sent["site-1"][0])
        assert travel_bytes(spec) < 0.5 * sum(p.numel() * 4 for p in build_model(ModelConfig(**model_cfg)).parameters())
        # the frozen encoder is identical before and after, and identical at both sites
        digests = [json.loads((out / f"{s}_frozen.json").read_text()) for s in sent]  # one entry per round
        assert all(d["before"] == d["after"] for log in digests for d in log)
        assert digests[0][0]["before"] == digests[1][0]["before"]

    cross = json.loads((server_job_dir(ws) / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cross) == {"site-1", "site-2"}
    for site_results in cross.values():
        assert "SRV_FL_global_model.pt" in site_results
        assert 0.0 <= site_results["SRV_FL_global_model.pt"]["dice"] <= 1.0
    assert (server_job_dir(ws) / "tb_events" / "site-1").is_dir()

    # the per-site report reads FLARE's own outputs: cross-site results and the streamed learning curves
    rows = site_table(ws)
    assert [r["site"] for r in rows] == ["site-1", "site-2", "average"]
    assert rows[0]["dice"] == pytest.approx(cross["site-1"]["SRV_FL_global_model.pt"]["dice"])
    assert rows[0]["dice_round0"] is not None  # round-0 validation Dice streamed through TensorBoard
    png = plot_report(ws, tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_contributions_are_rejected_and_the_job_completes_with_gaps(tmp_path):
    sites = {"site-1": 3, "site-2": 3, "site-3": 3, "site-4": 3, "site-5": 3}
    other_encoder = {**render_job("fedmsa_tiny")["app/config/config_fed_client.json"]["executors"][0]["executor"]["args"]["model_config"],
                     "init_seed": 1}
    data = make_sites(tmp_path / "data", sites)
    out = tmp_path / "recorded"
    recorder = {"path": "sim_support.RecordingFilter", "args": {"out_dir": str(out)}}
    job = write_job(tmp_path / "job", "fedmsa_tiny", {
        "app_good": {"sites": ["site-1"], "filters": [recorder]},
        # no travel filter at these two: the server's check is the last line of defence
        "app_nan": {"sites": ["site-2"], "executor": "sim_support.CorruptingExecutor",
                    "args": {"corruption": "nan"}, "travel_filter": False},
        "app_leak": {"sites": ["site-3"], "executor": "sim_support.CorruptingExecutor",
                     "args": {"corruption": "encoder"}, "travel_filter": False},
        # with the travel filter, the leaking site's result never leaves it
        "app_filtered": {"sites": ["site-4"], "executor": "sim_support.CorruptingExecutor",
                         "args": {"corruption": "encoder"}},
        # a well-behaved site whose frozen encoder is not the federation's (another checkpoint or seed)
        "app_other_encoder": {"sites": ["site-5"], "args": {"model_config": other_encoder}},
    }, min_sites=1)

    # the job runs to its end with the one good site, but the run is not a plain success: 4 sites never contributed
    assert run_simulation(job, tmp_path / "ws", list(sites), data_root=data) == 3

    good, _ = recorded(out, "site-1")
    global_model = load_global(tmp_path / "ws")
    assert set(global_model) == set(good)
    for key in good:  # only site-1 was accepted, so the average is site-1's model
        np.testing.assert_allclose(global_model[key], good[key], rtol=1e-6, atol=1e-7)
        assert np.isfinite(global_model[key]).all()
    server_log = (tmp_path / "ws" / "server" / "log.txt").read_text()
    assert "rejected contribution from site-2" in server_log and "NaN" in server_log
    assert "rejected contribution from site-3" in server_log and "unexpected tensor" in server_log
    assert "rejected contribution from site-4" not in server_log  # it never arrived
    assert "rejected contribution from site-5" in server_log and "frozen weights differ" in server_log
    site4_log = (tmp_path / "ws" / "site-4" / "log.txt").read_text()
    assert "refusing to send" in site4_log
    # the run record names every site that never contributed, and why
    record = read_run_record(server_job_dir(tmp_path / "ws"))
    assert record["status"] == "completed_with_gaps"
    missed = {site: info["missed"]["0"] for site, info in record["sites"].items() if info["missed"]}
    assert set(missed) == {"site-2", "site-3", "site-4", "site-5"}
    assert "NaN" in missed["site-2"] and "unexpected tensor" in missed["site-3"]
    assert "travel-set filter refused" in missed["site-4"] and "frozen weights differ" in missed["site-5"]
    assert record["sites"]["site-1"]["contributed"] == [0]


@SHARED
def test_mlflow_tracking_records_every_site_and_round(fedmsa_tracked_by_mlflow):
    from mlflow.tracking.client import MlflowClient

    rc, ws, _ = fedmsa_tracked_by_mlflow
    assert rc == 0

    stores = list(ws.rglob("mlflow.db"))
    assert len(stores) == 1, stores
    client = MlflowClient(tracking_uri=f"sqlite:///{stores[0]}")
    experiment = client.get_experiment_by_name("fedfms")
    runs = client.search_runs([experiment.experiment_id])
    by_site = {r.info.run_name.split("-")[0] + "-" + r.info.run_name.split("-")[1]: r for r in runs}
    assert set(by_site) == {"site-1", "site-2"}
    for site, run in by_site.items():
        for metric in ("train_loss", "val_dice", "val_iou", "lr", "samples", "seconds", "upload_mb", "val_dice_disc"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == [0, 1], (site, metric, history)
        samples = {m.value for m in client.get_metric_history(run.info.run_id, "samples")}
        assert len(samples) == 1 and samples.pop() > 0
