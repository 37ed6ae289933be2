"""The site pre-flight check reads everything a round would read and reports what the server compares."""

from pathlib import Path

import pytest

from fedfms.cli import main
from fedfms.errors import ConfigError, DataError
from fedfms.flare.jobs import write_job
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
