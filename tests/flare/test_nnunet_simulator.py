"""FednnU-Net end to end in FLARE's simulator (tiny nnU-Net plan, synthetic sites, CPU).

What the federation promises: only the agreed fingerprint fields leave a site in the planning step, the server
makes one plan and every site trains with exactly that plan, the global model is the sample-weighted average
of what the sites sent, and the model learns over the rounds."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfms.data.synthetic import make_disc_site
from fedfms.flare.fed_job import render_job
from fedfms.flare.jobs import RECIPE_KEY
from fedfms.run_record import read_run_record
from fedfms.flare.nnunet_planning import FINGERPRINTS_FILE
from fedfms.flare.simulate import run_simulation, server_job_dir
from fedfms.nnunet.evaluate import PLAN_FILE, read_plan
from fedfms.nnunet.fingerprint import FIELDS
from fedfms.nnunet.plan import plan_digest, travel_spec

SUPPORT = Path(__file__).with_name("nnunet_sim_support.py")
pytestmark = pytest.mark.integration


def write_job(job_dir: Path, sites: list[str], out: Path, num_rounds: int, **settings) -> Path:
    """The fednnunet_tiny job as the renderer makes it, one app for all sites plus a filter that records, after the
    project's own filters, everything each site sends (fingerprint, plan digest, updates)."""
    files = render_job("fednnunet_tiny", num_rounds=num_rounds, sites=sites, **settings)
    meta = files["meta.json"]
    meta.pop(RECIPE_KEY)  # used as written: with its recipe, the simulator would render it again without the recorder
    meta["deploy_map"] = {"app_server": ["server"], "app_sites": sites}
    job_dir.mkdir(parents=True)
    (job_dir / "meta.json").write_text(json.dumps(meta))
    (job_dir / "app_server" / "config").mkdir(parents=True)
    (job_dir / "app_server" / "config" / "config_fed_server.json").write_text(json.dumps(files["app/config/config_fed_server.json"]))
    client = files["app/config/config_fed_client.json"]
    recorder = {"path": "nnunet_sim_support.RecordEverythingSent", "args": {"out_dir": str(out)}}
    client["task_result_filters"][0]["filters"].append(recorder)
    client["task_result_filters"].append({"tasks": ["nnunet_fingerprint", "nnunet_plan"], "filters": [recorder]})
    (job_dir / "app_sites" / "config").mkdir(parents=True)
    (job_dir / "app_sites" / "config" / "config_fed_client.json").write_text(json.dumps(client))
    (job_dir / "app_sites" / "custom").mkdir()
    shutil.copy(SUPPORT, job_dir / "app_sites" / "custom" / SUPPORT.name)
    return job_dir


def test_fednnunet_one_plan_sample_weighted_fedavg_and_learning(tmp_path):
    sizes = {"site-1": 3, "site-2": 5, "site-3": 4}  # volumes of 4 slices: unequal FedAvg weights
    for i, (site, volumes) in enumerate(sizes.items()):
        make_disc_site(tmp_path / "data" / site, site=site, num_volumes=volumes, slices_per_volume=4,
                       brightness=(0.3, 0.4, 0.35)[i], seed=10 + i)
    sites, rounds, out = list(sizes), 4, tmp_path / "sent"
    job = write_job(tmp_path / "job", sites, out, rounds, train={"iterations_per_epoch": 15}, samples_per_site=20)

    # threads=3: every site keeps its process (FLARE starts a new one per task when sites wait their turn)
    assert run_simulation(job, tmp_path / "ws", sites, data_root=tmp_path / "data", threads=3) == 0

    app = server_job_dir(tmp_path / "ws") / "app_server"
    plan = read_plan(app / PLAN_FILE)
    digest = plan_digest(plan)
    received = json.loads((app / FINGERPRINTS_FILE).read_text())
    assert received["plan_digest"] == digest
    for site in sites:
        # exactly the agreed fields left the site in the planning step, and the server got exactly that
        sent = json.loads((out / f"{site}_STATISTICS.json").read_text())
        assert tuple(sent) == FIELDS and sent == received["received"][site]
        # one plan: every site built its trainer from the server's plan and trained every round with it
        assert json.loads((out / f"{site}_APP_DEFINED.json").read_text()) == {"plan_digest": digest}
        for r in range(rounds):
            assert json.loads((out / f"{site}_r{r}.json").read_text())["plan_digest"] == digest
    assert received["merged"]["num_cases"] == 4 * sum(sizes.values())

    # the global model is sum(n_k w_k) / sum(n_k) of what the sites sent in the last round
    last = {s: (dict(np.load(out / f"{s}_r{rounds - 1}.npz")), json.loads((out / f"{s}_r{rounds - 1}.json").read_text())) for s in sites}
    n = {s: last[s][1]["num_samples"] for s in sites}
    assert len(set(n.values())) == 3
    saved = torch.load(app / "FL_global_model.pt", weights_only=False)["model"]
    spec = travel_spec(plan)
    assert set(saved) == set(spec) == set(last["site-1"][0])
    for key in spec:
        expected = sum(n[s] * last[s][0][key].astype(np.float64) for s in sites) / sum(n.values())
        np.testing.assert_allclose(np.asarray(saved[key]), expected, rtol=1e-5, atol=1e-6, err_msg=key)
    key = next(k for k in spec if not np.allclose(last["site-1"][0][k], last["site-2"][0][k]))
    assert not np.allclose(np.asarray(saved[key]), last["site-1"][0][key])

    # Dice over rounds: each round's global model scored at every site before it trains on it
    record = read_run_record(server_job_dir(tmp_path / "ws"))
    assert record["status"] == "completed" and len(record["rounds"]) == rounds
    dice = [np.mean(list(r["val_dice"].values())) for r in record["rounds"]]
    cross = json.loads((server_job_dir(tmp_path / "ws") / "cross_site_val" / "cross_val_results.json").read_text())
    final = np.mean([cross[s]["SRV_FL_global_model.pt"]["dice"] for s in sites])
    assert final > dice[0] + 0.3 and dice[-1] > dice[0] + 0.2, (dice, final)
    for s in sites:
        scores = cross[s]["SRV_FL_global_model.pt"]
        assert 0 <= scores["dice_reference"] <= 1 and 0 <= scores["iou_reference"] <= 1


def test_a_site_that_cannot_take_part_stops_the_planning_with_its_reason(tmp_path):
    from fedfms.data.site_dataset import SiteWriter

    make_disc_site(tmp_path / "data" / "site-1", site="site-1", num_volumes=3, slices_per_volume=3)
    with SiteWriter(tmp_path / "data" / "site-2", "site-2", "synthetic", ["disc", "cup"], 32, 32) as writer:
        for v in range(2):  # another task: two classes where the job says one
            image = np.random.default_rng(v).uniform(0.1, 0.9, size=(32, 32))
            writer.add(image.astype(np.float32), np.zeros((2, 32, 32), np.uint8), f"case{v}", 0)
    sites, out = ["site-1", "site-2"], tmp_path / "sent"
    job = write_job(tmp_path / "job", sites, out, 2, samples_per_site=10)

    assert run_simulation(job, tmp_path / "ws", sites, data_root=tmp_path / "data") == 1

    record = read_run_record(server_job_dir(tmp_path / "ws"))
    assert record["status"] == "failed" and record["rounds"] == []
    assert "nnU-Net planning failed: site site-2:" in record["reason"] and "num_classes=1" in record["reason"]
    assert not (server_job_dir(tmp_path / "ws") / "app_server" / PLAN_FILE).exists()
    assert not list(out.glob("site-2_*"))  # nothing left the site that could not take part
