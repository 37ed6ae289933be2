"""Site-local data/checkpoint locations win over the job's defaults."""

import json

import pytest

from fedfms.errors import ConfigError
from fedfms.flare.site_config import SITE_CONFIG_FILE, resolve_site_settings


def test_job_default_expands_site_name_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFMS_DATA_ROOT", "/data/fl")
    s = resolve_site_settings("BIDMC", {"data_dir": "$FEDFMS_DATA_ROOT/{site_name}"}, tmp_path)
    assert s["data_dir"] == "/data/fl/BIDMC"


def test_site_file_overrides_job(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDFMS_DATA_ROOT", raising=False)
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps({"data_dir": "/mnt/prostate", "checkpoint": "/m/sam.pth", "device": "cuda:1"}))
    s = resolve_site_settings("HK", {"data_dir": "$FEDFMS_DATA_ROOT/{site_name}", "checkpoint": "$FEDFMS_SAM_CHECKPOINT"}, tmp_path)
    assert (s["data_dir"], s["checkpoint"], s["device"]) == ("/mnt/prostate", "/m/sam.pth", "cuda:1")


def test_unset_variable_and_typos_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDFMS_DATA_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"\$FEDFMS_DATA_ROOT.*not set"):
        resolve_site_settings("HK", {"data_dir": "$FEDFMS_DATA_ROOT/{site_name}"}, tmp_path)
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps({"data_dri": "/x"}))
    with pytest.raises(ConfigError, match="data_dri"):
        resolve_site_settings("HK", {}, tmp_path)
    (tmp_path / SITE_CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=SITE_CONFIG_FILE):
        resolve_site_settings("HK", {}, tmp_path)


def test_a_site_sets_its_own_processes_per_site(tmp_path):
    """How many GPUs (DDP processes) a site trains with is a site fact (docs/multi-gpu.md)."""
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps({"data_dir": "/d", "processes_per_site": 4}))
    assert resolve_site_settings("HK", {}, tmp_path)["processes_per_site"] == 4
