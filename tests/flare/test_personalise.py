"""Personalised federation in FLARE: the job setting, the filters that know a site's local part, and two simulator
runs that share the modes between them (tiny models, synthetic sites):

1. FedMSA, ``norm,decoder,finetune:1,alone``, three sites, one of which sends its local part with its travel-set
   filter removed: only the declared shared tensors leave the honest sites, the leaking site is refused by the
   server, the global model holds the shared part only, and every site ends with its global, personalised and alone
   models; ``report``, ``predict`` and ``evaluate`` read them.
2. FedSAM, ``head,finetune:1``, float16 transfer, the sites taking turns (one at a time: a site's process starts
   again for each task): the local part carries over from round to round through the site's disk.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from fedfms.cli import main
from fedfms.data.synthetic import make_disc_site
from fedfms.errors import ConfigError
from fedfms.flare.contribution_filter import ContributionCheckFilter
from fedfms.flare.replies import REASON_HEADER
from fedfms.flare.filters import TravelSetFilter
from fedfms.flare.fed_job import render_job, write_job as write_variant
from fedfms.flare.simulate import run_simulation, server_job_dir
from fedfms.flare.update_check import FROZEN_FINGERPRINT, expected_local_spec, expected_travel_spec
from fedfms.evaluation.personal import read_personal_record
from fedfms.models import ModelConfig, build_model, frozen_fingerprint
from fedfms.run_record import read_run_record
from fedfms.training.personal import MODEL_FILES, PERSONAL_DIR

SUPPORT = Path(__file__).with_name("personalise_support.py")
TINY_MSA = {"variant": "tiny", "mode": "fedmsa", "num_classes": 1, "pretrained": False, "init_seed": 0}


# ------------------------------------------------------------------------------------------------ job settings


def test_personalise_renders_the_local_part_the_step_and_its_task():
    files = render_job("fedmsa_tiny", personalise="finetune:2, norm", sites=["a", "b"])
    server, client = files["app/config/config_fed_server.json"], files["app/config/config_fed_client.json"]
    args = client["executors"][0]["executor"]["args"]
    assert args["model_config"]["local_parts"] == ["norm"] and args["personalise"] == "norm,finetune:2"
    assert client["executors"][0]["tasks"] == ["train", "validate", "submit_model", "personalise"]
    # the travel-set filter and the server's check get the model config with its local part
    check = next(f for c in server["task_result_filters"] for f in c["filters"] if f["path"].endswith("ContributionCheckFilter"))
    assert check["args"]["model_config"]["local_parts"] == ["norm"]
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["model"]["args"]["local_parts"] == ["norm"]
    # after the last round and before cross-site evaluation: FLARE's BroadcastAndProcess with the recorder
    assert [w["id"] for w in server["workflows"]] == ["scatter_and_gather", "personalise", "cross_site_validate"]
    step = server["workflows"][1]
    assert step["path"] == "nvflare.app_common.workflows.broadcast_and_process.BroadcastAndProcess"
    # no bound from an assumed speed: the liveness watch ends dead or silent sites; only round_timeout bounds it
    assert step["args"]["processor"] == "personalisation" and step["args"].get("timeout", 0) == 0
    bounded = render_job("fedmsa_tiny", personalise="norm", round_timeout=900)["app/config/config_fed_server.json"]
    assert bounded["workflows"][1]["args"]["timeout"] == 900
    # float16: the final global model goes through FLARE's quantisation too
    f16 = render_job("fedmsa_tiny", personalise="head", transfer="float16")
    data_chain = f16["app/config/config_fed_client.json"]["task_data_filters"][0]
    assert data_chain["tasks"] == ["train", "validate", "personalise"]
    # a job without the setting is the job it always was
    plain = render_job("fedmsa_tiny")["app/config/config_fed_client.json"]["executors"][0]["executor"]["args"]
    assert "local_parts" not in plain["model_config"] and "personalise" not in plain


@pytest.mark.parametrize("settings,message", [
    ({"personalise": "bn"}, "personalise: 'bn'"),
    ({"model": {"local_parts": ["norm"]}}, "is set by the job's personalise setting; use --personalise norm"),
    ({"personalise": "norm", "model": {"local_parts": ["head"]}}, "differ from personalise 'norm'"),
    ({"personalise": "norm", "encryption": "he"}, "not supported yet"),
    ({"personalise": "norm", "processes_per_site": 2}, "personalised jobs train in one process per site"),
    ({"personalise": "head", "flavour": "reference"}, "has no trained head"),
])
def test_bad_personalise_settings_fail_when_the_job_is_made(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        render_job("fedmsa_tiny", **settings)


def test_personalise_is_refused_for_nnunet_and_decoder_for_the_unet():
    with pytest.raises(ConfigError, match="nnU-Net baseline has its own trainer"):
        render_job("fednnunet_tiny", personalise="norm")
    with pytest.raises(ConfigError, match="has no trained decoder"):
        render_job("fedunet", personalise="decoder")


def test_job_new_takes_personalise(tmp_path, capsys):
    assert main(["job", "new", "fedmsa_tiny", str(tmp_path / "j"), "--personalise", "norm,finetune:3,alone", "--rounds", "4"]) == 0
    args = json.loads((tmp_path / "j/app/config/config_fed_client.json").read_text())["executors"][0]["executor"]["args"]
    assert args["personalise"] == "norm,finetune:3,alone" and args["alone_epochs"] == 4 * 20
    assert main(["job", "new", "fedmsa_tiny", str(tmp_path / "k"), "--personalise", "alone"]) == 2
    assert "personalises nothing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the filters


def _update(spec):
    return {k: np.zeros(shape, dtype=np.float32) for k, (shape, _) in spec.items()}


def test_site_filter_and_server_check_accept_the_shared_part_and_refuse_the_local_part():
    config = {**TINY_MSA, "local_parts": ["norm"]}
    shared, local = expected_travel_spec(config), expected_local_spec(config)
    assert local and not set(local) & set(shared)
    assert set(shared) | set(local) == set(expected_travel_spec(TINY_MSA))  # together: everything FedMSA trains

    site = TravelSetFilter("fedmsa", config)
    ok = DXO(DataKind.WEIGHTS, _update(shared)).to_shareable()
    assert site.process(ok, FLContext()) is ok
    leaky = DXO(DataKind.WEIGHTS, {**_update(shared), **_update(local)}).to_shareable()
    reply = site.process(leaky, FLContext())
    assert reply.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR and "DXO" not in reply
    assert f"{len(local)} tensor(s) of the sites' local part (norm)" in reply.get_header(REASON_HEADER)
    # the encoder is still refused, as in any job
    encoder = DXO(DataKind.WEIGHTS, {**_update(shared), "image_encoder.blocks.0.attn.qkv.weight": np.zeros(3, np.float32)})
    assert "outside the fedmsa travel set" in site.process(encoder.to_shareable(), FLContext()).get_header(REASON_HEADER)

    fingerprint = frozen_fingerprint(build_model(ModelConfig(**config)), "fedmsa")
    check = ContributionCheckFilter(config, persistor_id="")

    def result(data):
        dxo = DXO(DataKind.WEIGHTS, data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 4, FROZEN_FINGERPRINT: fingerprint})
        shareable = dxo.to_shareable()
        shareable.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
        shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
        ctx = FLContext()
        ctx.set_prop(FLContextKey.TASK_NAME, "train", private=True, sticky=False)
        return check.process(shareable, ctx)

    assert result(_update(shared)).get_return_code(ReturnCode.OK) == ReturnCode.OK
    refused = result({**_update(shared), **_update(local)})
    assert refused.get_return_code() == ReturnCode.BAD_TASK_DATA
    reason = refused.get_header(REASON_HEADER)
    assert "local part (norm)" in reason and "unexpected tensor" in reason
    short = _update(shared)
    short.pop(next(iter(short)))
    assert "missing tensor" in result(short).get_header(REASON_HEADER)


def test_a_site_without_its_personalised_model_makes_the_run_a_run_with_gaps(tmp_path, capsys):
    from fedfms.flare.simulate import simulation_outcome

    run = server_job_dir(tmp_path / "ws")
    run.mkdir(parents=True)
    (run / "fedfms_run.json").write_text(json.dumps({"status": "completed", "expected_sites": ["s1", "s2"], "rounds": []}))
    ok = {"status": "ok", "global": {"dice": 0.7}, "personal": {"dice": 0.75}}
    (run / "fedfms_personal.json").write_text(json.dumps({"personalise": "norm", "sites": {"s1": ok, "s2": ok}}))
    assert simulation_outcome(tmp_path / "ws", 0).exit_code == 0
    failed = {"status": "failed", "reason": "the personalisation step did not finish"}
    (run / "fedfms_personal.json").write_text(json.dumps({"personalise": "norm", "sites": {"s1": ok, "s2": failed}}))
    outcome = simulation_outcome(tmp_path / "ws", 0)
    assert outcome.exit_code == 3
    assert "s2: no personalised model (the personalisation step did not finish)" in outcome.summary
    assert main(["report", str(tmp_path / "ws")]) == 3
    assert "warning: s2: no personalised model" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ simulator runs


def make_sites(root: Path, sizes: dict[str, int]) -> Path:
    for i, (site, volumes) in enumerate(sizes.items()):
        make_disc_site(root / site, site=site, num_volumes=volumes, slices_per_volume=3, seed=i)
    return root


def write_job(job_dir: Path, variant: str, apps: dict[str, dict], probe: Path, without_cross_site: bool = False,
              **settings) -> Path:
    """The rendered job with one app per group of sites: ``executor``/``args`` replace the site's executor,
    ``travel_filter: False`` removes its travel-set filter; every site gets the probe as its last result filter.
    ``without_cross_site``: no cross-site evaluation (a test that does not need it saves its tasks)."""
    sites = sorted(s for app in apps.values() for s in app["sites"])
    files = render_job(variant, sites=sites, **settings)
    if without_cross_site:
        server = files["app/config/config_fed_server.json"]
        server["workflows"] = [w for w in server["workflows"] if w["id"] != "cross_site_validate"]
    meta = files["meta.json"]
    meta["deploy_map"] = {"app_server": ["server"], **{name: app["sites"] for name, app in apps.items()}}
    job_dir.mkdir(parents=True)
    (job_dir / "meta.json").write_text(json.dumps(meta))
    (job_dir / "app_server" / "config").mkdir(parents=True)
    (job_dir / "app_server" / "config" / "config_fed_server.json").write_text(json.dumps(files["app/config/config_fed_server.json"]))
    probe_filter = {"path": "personalise_support.ProbeFilter", "args": {"out_dir": str(probe)}}
    for name, app in apps.items():
        client = json.loads(json.dumps(files["app/config/config_fed_client.json"]))
        executor = client["executors"][0]["executor"]
        executor["path"] = app.get("executor", executor["path"])
        executor["args"].update(app.get("args", {}))
        chain = client["task_result_filters"][0]
        assert chain["tasks"] == ["train", "submit_model"]
        if not app.get("travel_filter", True):
            chain["filters"] = [f for f in chain["filters"] if not f["path"].endswith("TravelSetFilter")]
        chain["filters"].append(probe_filter)
        client["task_result_filters"].append({"tasks": ["personalise"], "filters": [probe_filter]})
        (job_dir / name / "config").mkdir(parents=True)
        (job_dir / name / "config" / "config_fed_client.json").write_text(json.dumps(client))
        (job_dir / name / "custom").mkdir()
        shutil.copy(SUPPORT, job_dir / name / "custom" / "personalise_support.py")
    return job_dir


def sent(probe: Path) -> list[dict]:
    return [json.loads(line) for line in (probe / "sent.jsonl").read_text().splitlines()]


def site_folder(workspace: Path, site: str) -> Path:
    return workspace / site / "simulate_job" / PERSONAL_DIR



@pytest.mark.integration
def test_norm_decoder_finetune_alone_only_the_shared_part_leaves_and_every_site_keeps_its_models(tmp_path, capsys):
    personalise = "norm,decoder,finetune:1,alone"
    data = make_sites(tmp_path / "data", {"site-1": 3, "site-2": 4, "site-3": 3})
    probe = tmp_path / "probe"
    ws = tmp_path / "ws"
    job = write_job(tmp_path / "job", "fedmsa_tiny", {
        "app_honest": {"sites": ["site-1", "site-2"]},
        # no travel-set filter: the server's check is what stops its local part
        "app_leak": {"sites": ["site-3"], "executor": "personalise_support.LeakingExecutor", "travel_filter": False},
    }, probe, num_rounds=2, train={"epochs": 2}, personalise=personalise, min_sites=2)
    config = {**TINY_MSA, "local_parts": ["norm", "decoder"]}
    shared, local = expected_travel_spec(config), expected_local_spec(config)
    assert all("adapter" in k for k in shared)  # FedMSA with a local decoder shares its adapters only

    # site-3's contributions are all refused: the run ends, truthfully, with gaps
    assert run_simulation(job, ws, ["site-1", "site-2", "site-3"], data_root=data) == 3

    # the probe: what left each site
    results = sent(probe)
    honest = [r for r in results if r["site"] in ("site-1", "site-2")]
    assert {(r["task"], r["kind"]) for r in honest} == {("train", "WEIGHTS"), ("submit_model", "WEIGHTS"), ("personalise", "METRICS")}
    for r in honest:
        if r["kind"] == "WEIGHTS":
            assert r["keys"] == sorted(shared), (r["site"], r["task"])  # exactly the declared shared tensors
        else:
            assert r["keys"] == [] and set(r["fields"]) <= {"global", "personal", "alone", "alone_epochs", "files"}
    leaked = [r for r in results if r["site"] == "site-3" and r["task"] == "train"]
    assert len(leaked) == 2 and all(set(local) <= set(r["keys"]) for r in leaked)

    # the server refused every one of them, naming the local part
    record = read_run_record(server_job_dir(ws))
    assert record["status"] == "completed_with_gaps"
    assert record["sites"]["site-3"]["contributed"] == []
    assert all("local part (norm, decoder)" in why for why in record["sites"]["site-3"]["missed"].values())
    assert record["sites"]["site-1"]["contributed"] == [0, 1] == record["sites"]["site-2"]["contributed"]

    # the global model is the shared part only, and the average of what the honest sites sent
    server_model = torch.load(server_job_dir(ws) / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    assert set(server_model) == set(shared)
    rounds = {s: dict(np.load(probe / f"{s}_r1.npz")) for s in ("site-1", "site-2")}
    n = {"site-1": 2, "site-2": 3}  # train slices after the 0.2 split of 3 and 4 volumes (by patient)
    key = sorted(shared)[0]
    np.testing.assert_allclose(np.asarray(server_model[key]),
                               sum(n[s] * rounds[s][key].astype(np.float64) for s in n) / sum(n.values()), rtol=1e-5, atol=1e-6)

    # every site ends with its models beside its local part, and the record has its scores
    personal = read_personal_record(server_job_dir(ws))
    assert personal["personalise"] == personalise and set(personal["sites"]) == {"site-1", "site-2", "site-3"}
    cross = json.loads((server_job_dir(ws) / "cross_site_val" / "cross_val_results.json").read_text())
    for site in ("site-1", "site-2", "site-3"):
        entry = personal["sites"][site]
        assert entry["status"] == "ok" and entry["alone_epochs"] == 2 * 2
        folder = site_folder(ws, site)
        assert {p.name for p in folder.iterdir()} == {*MODEL_FILES.values(), "local_part.pt"}
        models = {kind: torch.load(folder / name, weights_only=True)["model"] for kind, name in MODEL_FILES.items()}
        own = torch.load(folder / "local_part.pt", weights_only=True)
        assert set(own) == set(local)
        # global_model.pt: the server's final global model with this site's own local part
        for k in shared:
            np.testing.assert_allclose(models["global"][k].numpy(), np.asarray(server_model[k]), rtol=1e-6, atol=1e-7)
        assert all(torch.equal(models["global"][k], own[k]) for k in local)
        # fine-tuned: the personalised model moved away from it
        assert any(not torch.equal(models["global"][k], models["personal"][k]) for k in models["global"])
        # FLARE's cross-site evaluation of the global model at the site means the same model, on the same slices
        assert cross[site]["SRV_FL_global_model.pt"]["dice"] == pytest.approx(entry["global"]["dice"], abs=1e-6)
        for kind in ("global", "personal", "alone"):
            assert 0 <= entry[kind]["dice"] <= 1

    # the report shows global / personalised / alone per site and keeps the gap in its exit code
    capsys.readouterr()
    assert main(["report", str(ws)]) == 3
    out = capsys.readouterr().out
    assert "personalisation norm,decoder,finetune:1,alone" in out and "personalised - max(global, alone)" in out
    assert all(line.split()[0] in ("site-1", "site-2", "site-3", "mean") for line in out.split("personalised - max")[1].splitlines()[2:6])

    # predict and evaluate take a site's models, and name what the server's global model lacks
    job_dir = tmp_path / "plainjob"
    write_variant("fedmsa_tiny", job_dir, personalise=personalise)
    image = next((data / "site-1" / "images").glob("*.png"))
    assert main(["predict", str(image), "--job", str(job_dir), "--weights", str(site_folder(ws, "site-1") / "personal_model.pt"),
                 "--out", str(tmp_path / "pred")]) == 0
    assert main(["predict", str(image), "--job", str(job_dir), "--out", str(tmp_path / "pred2"),
                 "--weights", str(server_job_dir(ws) / "app_server" / "FL_global_model.pt")]) == 2
    assert "holds the shared part of a personalised model only" in capsys.readouterr().err
    scores = tmp_path / "scores.json"
    assert main(["evaluate", str(data / "site-2"), "--job", str(job_dir), "--weights",
                 str(site_folder(ws, "site-2") / "global_model.pt"), "--json", str(scores)]) == 0
    assert 0 <= json.loads(scores.read_text())["sites"][0]["dice"] <= 1


@pytest.mark.integration
def test_head_finetune_float16_sites_in_turn_carry_their_local_part_over(tmp_path):
    data = make_sites(tmp_path / "data", {"site-1": 3, "site-2": 3})
    probe = tmp_path / "probe"
    ws = tmp_path / "ws"
    job = write_job(tmp_path / "job", "fedsam_tiny", {
        "app": {"sites": ["site-1", "site-2"], "executor": "personalise_support.LocalPartRecordingExecutor",
                "args": {"out_dir": str(probe)}}}, probe, num_rounds=1, train={"epochs": 1},
        personalise="head,finetune:1", transfer="float16", without_cross_site=True)
    # one site at a time: each task starts the site's process again (cross-site evaluation left out: its eight tasks
    # would each start a process too)
    assert run_simulation(job, ws, ["site-1", "site-2"], data_root=data, threads=1) == 0

    config = {**render_job("fedsam_tiny")["app/config/config_fed_client.json"]["executors"][0]["executor"]["args"]["model_config"],
              "local_parts": ["head"]}
    shared = expected_travel_spec(config)
    assert "head.weight" not in shared and len(shared) == len(expected_travel_spec(config | {"local_parts": []})) - 2
    trained = [r for r in sent(probe) if r["task"] == "train"]
    assert len(trained) == 2 and all(r["keys"] == sorted(shared) for r in trained)
    server_model = torch.load(server_job_dir(ws) / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    assert not any(k.startswith("head.") for k in server_model)

    # the personalisation step ran in a new process of the site, and started from the head its round had trained
    from personalise_support import local_digest

    events = [json.loads(line) for line in (probe / "local.jsonl").read_text().splitlines()]
    personal = read_personal_record(server_job_dir(ws))
    for site in ("site-1", "site-2"):
        trained_round, step = [e for e in events if e["site"] == site]
        assert (trained_round["round"], step["round"]) == (0, "personalise")
        assert trained_round["start"] != trained_round["end"]  # the head trains
        assert step["pid"] != trained_round["pid"], "the site's process was started again"
        assert step["start"] == trained_round["end"], f"{site}: the new process did not go on with its own head"
        saved = torch.load(site_folder(ws, site) / "global_model.pt", weights_only=True)["model"]
        assert local_digest({k: saved[k].numpy() for k in ("head.weight", "head.bias")}) == trained_round["end"]
        assert personal["sites"][site]["status"] == "ok"  # the final global model reached it through float16
