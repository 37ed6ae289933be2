"""The site pre-flight check reads everything a round would read and reports what the server compares."""

from pathlib import Path

import pytest

from fedfms.cli import main
from fedfms.errors import ConfigError, DataError
from fedfms.flare.fed_job import write_job
from fedfms.models import ModelConfig, build_model, frozen_fingerprint
from fedfms.site_check import check_site, format_report

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_report_matches_what_training_and_the_server_will_see(disc_site):
    report = check_site(JOBS / "fedmsa_tiny", disc_site, site_name="site-1")
    assert report["data"]["samples"] == 40 and report["data"]["volumes"] == 5
    assert report["data"]["train_samples"] + report["data"]["val_samples"] == 40
    assert report["data"]["val_samples"] == 8  # 1 of 5 volumes: the job's val_fraction 0.2, split by patient
    same = build_model(ModelConfig(variant="tiny", mode="fedmsa", pretrained=False, init_seed=0))
    assert report["model"]["frozen_fingerprint"] == frozen_fingerprint(same, "fedmsa")
    assert "ready" in format_report(report)
    # the FedAvg weight the site will report, which the coordinator can pin in the job
    from fedfms.flare.jobs import job_model_config, job_train_config
    from fedfms.training.trainer import LocalTrainer, TrainConfig

    trainer = LocalTrainer(ModelConfig.from_dict(job_model_config(JOBS / "fedmsa_tiny")),
                           TrainConfig.from_dict(job_train_config(JOBS / "fedmsa_tiny")), disc_site)
    assert trainer.num_train_samples == report["data"]["train_samples"] == 32
    assert "--site-samples site-1=32" in format_report(report)


def test_a_broken_file_or_a_class_mismatch_is_named(disc_site, tmp_path):
    mask = sorted((disc_site / "masks").glob("*.png"))[3]
    mask.write_bytes(b"not a png")
    with pytest.raises(DataError, match=mask.name):
        check_site(JOBS / "fedmsa_tiny", disc_site)
    job = write_job("fedmsa_tiny", tmp_path / "job2", num_classes=2)
    with pytest.raises(ConfigError, match="num_classes=2"):
        check_site(job, disc_site)


def test_cli_says_what_is_missing_in_one_line(disc_site, monkeypatch, capsys):
    monkeypatch.delenv("FEDFMS_SAM_CHECKPOINT", raising=False)
    assert main(["check-site", "--job", str(JOBS / "fedmsa"), "--data-dir", str(disc_site)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FEDFMS_SAM_CHECKPOINT" in err[0]
    assert main(["check-site", "--job", str(JOBS / "fedmsa_tiny"), "--data-dir", str(disc_site)]) == 0
    assert "frozen weights fingerprint" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# warnings: what would not stop a run but makes it uninformative (fast: manifest and split only)

import numpy as np

from fedfms.data.site_dataset import SiteWriter
from fedfms.data.synthetic import make_disc_site
from fedfms.data.site_warnings import TRAIN_DEFAULTS, site_warnings


def _site(path, volumes, slices, positive=lambda v, k: k % 2 == 0):
    rng = np.random.default_rng(0)
    with SiteWriter(path, path.name, "t", ["fg"], 32, 8) as w:
        for v in range(volumes):
            for k in range(slices):
                mask = np.zeros((16, 16), np.uint8)
                if positive(v, k):
                    mask[4:9, 4:9] = 1
                w.add(rng.uniform(0, 1, (16, 16)), mask, f"p{v}", k)
    return path


def test_a_healthy_site_has_no_warnings(tmp_path):
    assert site_warnings(_site(tmp_path / "ok", volumes=5, slices=4), {"batch_size": 6, "val_fraction": 0.2}) == []


def test_each_uninformative_condition_is_one_line(tmp_path):
    one = _site(tmp_path / "one", volumes=1, slices=3)
    lines = site_warnings(one, {"batch_size": 6})
    assert len(lines) == 2
    assert lines[0].startswith(f"{one}: no validation samples (1 volume(s)") and "empty ('-')" in lines[0]
    assert lines[1] == f"{one}: 3 training sample(s), fewer than one batch (batch_size 6): one small step per local epoch"
    small = _site(tmp_path / "small", volumes=2, slices=2)  # 2 train / 2 val samples
    assert any("fewer than one batch" in line for line in site_warnings(small, {}))  # TrainConfig's batch_size 6
    tiny_val = _site(tmp_path / "tiny_val", volumes=4, slices=1, positive=lambda v, k: v % 2 == 0)
    assert any("1 validation sample" in line for line in site_warnings(tiny_val, {"batch_size": 2}))
    none = _site(tmp_path / "none", volumes=5, slices=4, positive=lambda v, k: False)
    assert [line for line in site_warnings(none, {"batch_size": 2}) if "positive fraction 0" in line]
    every = _site(tmp_path / "every", volumes=5, slices=4, positive=lambda v, k: True)
    assert [line for line in site_warnings(every, {"batch_size": 2}) if "positive fraction 1" in line]
    assert all("\n" not in line for line in site_warnings(one, {}) + site_warnings(none, {}))


def test_warnings_for_a_class_mismatch_and_an_unreadable_site_never_raise(tmp_path):
    ok = _site(tmp_path / "ok", volumes=5, slices=4)
    assert site_warnings(ok, {"batch_size": 2}, {"num_classes": 2}) == [
        f"{ok}: the job's model has num_classes=2, the site has 1 class(es) ['fg']: it will refuse to start"
    ]
    lines = site_warnings(tmp_path / "missing", {})
    assert len(lines) == 1 and "site folder does not exist" in lines[0]


def test_warning_defaults_are_the_trainers():
    from fedfms.training.trainer import TrainConfig

    assert TRAIN_DEFAULTS == {k: getattr(TrainConfig(), k) for k in TRAIN_DEFAULTS}


def test_check_site_says_ready_with_warnings_and_exits_0(tmp_path, capsys):
    site = make_disc_site(tmp_path / "one", site="one", num_volumes=1, slices_per_volume=3)
    report = check_site(JOBS / "fedmsa_tiny", site, site_name="one")
    assert report["data"]["val_samples"] == 0 and len(report["warnings"]) == 3  # no val, < batch, positive fraction 1
    assert main(["check-site", "--job", str(JOBS / "fedmsa_tiny"), "--data-dir", str(site), "--site", "one"]) == 0
    captured = capsys.readouterr()
    assert "site one: ready, with 3 warning(s)" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("warning: ") for line in err)
    assert "no validation samples" in err[0]


def test_random_init_needs_no_checkpoint_at_the_site_nor_in_check_site(disc_site, tmp_path, monkeypatch, capsys):
    from fedfms.flare.site_config import resolve_site_settings

    # the command: --model '{"pretrained": false}' alone on a job whose checkpoint is $FEDFMS_SAM_CHECKPOINT
    monkeypatch.delenv("FEDFMS_SAM_CHECKPOINT", raising=False)
    monkeypatch.setenv("FEDFMS_DATA_ROOT", str(disc_site.parent))  # the site's data root (a job's paths stay inside it)
    job = write_job("fedmsa_tiny", tmp_path / "job", model={"checkpoint": "$FEDFMS_SAM_CHECKPOINT"})
    defaults = {"data_dir": str(disc_site), "checkpoint": "$FEDFMS_SAM_CHECKPOINT"}
    assert resolve_site_settings("site-1", defaults, None, pretrained=False)["checkpoint"] is None  # the executor's rule
    with pytest.raises(ConfigError, match="FEDFMS_SAM_CHECKPOINT"):
        resolve_site_settings("site-1", defaults, None, pretrained=True)
    assert main(["check-site", "--job", str(job), "--data-dir", str(disc_site)]) == 0
    out = capsys.readouterr().out
    assert "random init" in out


def test_check_site_measures_this_sites_own_seconds_per_sample(disc_site):
    report = check_site(JOBS / "fedmsa_tiny", disc_site, site_name="site-1")
    speed = report["speed"]
    assert speed["device"] == "cpu" and speed["batch"] == 6 and speed["s_per_sample"] > 0
    assert speed["round_estimate_s"] > speed["s_per_sample"] and speed["peak_rss_gb"] > 0.1
    assert "s/sample on cpu (one training step of 6 sample(s)" in format_report(report)
    assert "speed" not in check_site(JOBS / "fedmsa_tiny", disc_site, measure_speed=False)
