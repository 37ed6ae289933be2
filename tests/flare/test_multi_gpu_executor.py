"""The executor's multi-process switch (processes_per_site): its glue around fedfms.training.distributed.launch_round,
with the launcher replaced (the launcher itself: tests/training/test_distributed.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal

from fedfms.errors import ConfigError
from fedfms.flare import executor as executor_module
from fedfms.flare.executor import FedFMSExecutor
from fedfms.flare.site_config import SITE_CONFIG_FILE
from fedfms.training.distributed import RoundAborted
from fedfms.training.trainer import RoundResult

MODEL = {"variant": "tiny", "mode": "fedmsa", "num_classes": 1, "pretrained": False}
TRAIN = {"lr": 1e-3, "batch_size": 6, "progress": False}


class _Workspace:
    def __init__(self, local_dir):
        self.local_dir = local_dir

    def get_site_config_dir(self):
        return str(self.local_dir)

    def get_run_dir(self, job_id):
        return str(self.local_dir.parent / job_id)


class _Engine:
    def __init__(self, local_dir):
        self.workspace = _Workspace(local_dir)

    def get_workspace(self):
        return self.workspace

    def get_component(self, _id):
        return None


def site_context(local_dir, site="site-1") -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(ReservedKey.ENGINE, _Engine(local_dir), private=True, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=False, sticky=False)
    return ctx


def test_processes_per_site_is_an_argument_kept_under_its_own_name():
    assert FedFMSExecutor(MODEL).processes_per_site == 1
    executor = FedFMSExecutor(MODEL, processes_per_site=4, round_timeout_s=3600)
    assert (executor.processes_per_site, executor.round_timeout_s) == (4, 3600)  # FLARE's Job API reads them back
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="processes_per_site"):
            FedFMSExecutor(MODEL, processes_per_site=bad)


def test_the_site_file_sets_processes_and_train_goes_through_the_launcher(disc_site, tmp_path, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    (local / SITE_CONFIG_FILE).write_text(json.dumps({"data_dir": str(disc_site), "processes_per_site": 2}))
    executor = FedFMSExecutor(MODEL, TRAIN, tb_writer_id=None)
    ctx = site_context(local)
    executor._setup(ctx)
    assert executor.processes_per_site == 1 and executor.processes == 2  # the argument stays the job's setting
    assert executor.work_dir == str(tmp_path / "job-1" / "fedfms_ddp")  # rank logs in the job's run folder
    start = executor.trainer.travel_weights()
    calls = []

    def fake_launch(**kwargs):
        calls.append(kwargs)
        trained = {k: v + 0.5 for k, v in kwargs["global_weights"].items()}
        return RoundResult(trained, 32, {"train": {"loss": 0.25, "steps": 6, "seconds": 1.0}, "val_before": {"dice": 0.5}})

    monkeypatch.setattr(executor_module, "launch_round", fake_launch)
    incoming = DXO(DataKind.WEIGHTS, {k: v.numpy() for k, v in start.items()}).to_shareable()
    for rnd in range(2):
        reply = executor._train(incoming, ctx, Signal())
        dxo = from_shareable(reply)
        assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 32
        assert dxo.get_meta_prop(MetaKey.INITIAL_METRICS) == {"val_dice": 0.5}
        key = next(iter(start))
        np.testing.assert_allclose(dxo.data[key], start[key].numpy() + 0.5)
        # the in-process model took the result (validate / submit_model see it) and counts the round
        assert torch.equal(executor.trainer.travel_weights()[key], start[key] + 0.5)
        assert executor.trainer.rounds_done == rnd + 1
    first, second = calls
    assert (first["nproc"], first["site_dir"], first["rounds_done"], first["optimizer_state"]) == (2, str(disc_site), 0, None)
    assert first["model_config"]["variant"] == "tiny" and first["train_config"]["batch_size"] == 6
    assert second["rounds_done"] == 1 and second["optimizer_state"] == f"{executor.work_dir}/optimizer.pt"

    def aborted(**kwargs):
        raise RoundAborted("stopped")

    monkeypatch.setattr(executor_module, "launch_round", aborted)
    assert executor._train(incoming, ctx, Signal()).get_return_code() == ReturnCode.TASK_ABORTED


def test_one_process_keeps_training_in_process(disc_site, tmp_path, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    (local / SITE_CONFIG_FILE).write_text(json.dumps({"data_dir": str(disc_site)}))
    executor = FedFMSExecutor(MODEL, {**TRAIN, "max_steps_per_epoch": 1}, tb_writer_id=None)
    executor._setup(site_context(local))
    monkeypatch.setattr(executor_module, "launch_round", lambda **kw: pytest.fail("the launcher ran for one process"))
    weights = {k: v.numpy() for k, v in executor.trainer.travel_weights().items()}
    reply = executor._train(DXO(DataKind.WEIGHTS, weights).to_shareable(), site_context(local), Signal())
    assert from_shareable(reply).get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 32
    assert executor.work_dir is None and executor.trainer.rounds_done == 1


def test_an_executor_without_a_ddp_round_says_so():
    """A subclass with its own set-up (nnU-Net's) never prepares a DDP round: one line, not a TypeError."""
    executor = FedFMSExecutor(MODEL, processes_per_site=2)
    with pytest.raises(ConfigError, match="processes_per_site=2: FedFMSExecutor trains in one process only"):
        executor._train_distributed({}, Signal())


@pytest.mark.integration
def test_a_simulated_federation_of_two_process_sites_completes(tmp_path):
    """The whole path: a job with processes_per_site=2, FLARE's simulator, each site's executor launching torchrun
    (gloo, 2 ranks) per round; every site contributes once with its own sample count (not x2)."""
    from fedfms.data.synthetic import make_disc_site
    from fedfms.flare.fed_job import write_job
    from fedfms.flare.simulate import run_simulation, server_job_dir
    from fedfms.run_record import read_run_record
    from fedfms.site_check import check_site

    sizes = {"site-1": 2, "site-2": 3}
    for i, (site, volumes) in enumerate(sizes.items()):
        make_disc_site(tmp_path / "data" / site, site=site, num_volumes=volumes, slices_per_volume=3, seed=i)
    job = write_job("fedmsa_tiny", tmp_path / "job", sites=list(sizes), num_rounds=1, processes_per_site=2)
    assert json.loads((job / "app/config/config_fed_client.json").read_text())["executors"][0]["executor"]["args"][
        "processes_per_site"] == 2
    assert run_simulation(job, tmp_path / "ws", list(sizes), data_root=tmp_path / "data", quiet=True) == 0
    record = read_run_record(server_job_dir(tmp_path / "ws"))
    for site in sizes:
        single_process = check_site(job, tmp_path / "data" / site, site_name=site)["data"]["train_samples"]
        assert record["sites"][site] == {"samples": single_process, "contributed": [0], "missed": {}}
        ranks = sorted(p.name for p in (tmp_path / "ws" / site).rglob("fedfms_ddp/logs/rank*.log"))
        assert ranks == ["rank0.log", "rank1.log"], ranks
