"""What a job may make a site do (issue 28): the exact class allow-list, and the argument guard a kit installs.

The attack these close: a job without custom code named ``fedfms.deploy.site_setup.add_class_allow_list`` (a
*function*, admitted by the old ``"fedfms."`` prefix entry) with the kit's own folder as argument, which rewrote
the site's allow-list so that the next component, ``subprocess.run``, ran a shell command at every hospital.
The end-to-end attacks, in a provisioned federation, are in tests/flare_deploy/test_attacks.py."""

from __future__ import annotations

import importlib
import inspect
import json

import pytest

from fedfms.deploy import site_setup
from fedfms.errors import ConfigError
from fedfms.flare.job_guard import SITE_PATHS, check_component
from fedfms.flare.jobs import component_paths
from fedfms.flare.fed_job import _allow_list_renders, class_allow_list, render_job
from fedfms.flare.site_config import SITE_CONFIG_FILE, resolve_site_settings

EXECUTOR = "fedfms.flare.executor.FedFMSExecutor"


def _obj(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_allow_list_names_classes_only_and_covers_every_job():
    allowed = class_allow_list()
    assert not [e for e in allowed if e.endswith(".") or e == "*"], "no prefix entries"
    assert [e for e in allowed if not inspect.isclass(_obj(e))] == [], "nothing on the list is a function"
    assert "fedfms.deploy.site_setup.add_class_allow_list" not in allowed
    # every class any job variant names, under every option the builder has, is on the list
    for name, option in _allow_list_renders():
        assert component_paths(render_job(name, **option)) <= set(allowed), (name, option)
    assert component_paths(render_job("fedmsa", update="weight_diff", aggregation="trimmed_mean")) <= set(allowed)
    # the guard's table names real classes (a typo there would silently skip a check)
    assert all(inspect.isclass(_obj(cls)) for cls, _ in SITE_PATHS)


def _kit(tmp_path):
    kit = tmp_path / "hospital-a"
    for sub in ("startup", "local", "job1"):
        (kit / sub).mkdir(parents=True)
    (kit / "local" / "resources.json.default").write_text(json.dumps(
        {"format_version": 2, "class_allow_list": ["nvflare.app_common.workflows.fedavg.FedAvg", "fedfms."],
         "components": [{"id": "resource_manager", "path": "x.Y", "args": {}}]}))
    return kit


def test_site_setup_writes_exact_classes_removes_prefixes_and_installs_the_guard(tmp_path):
    kit = _kit(tmp_path)
    path, removed = site_setup.add_class_allow_list(kit)
    resources = json.loads(path.read_text())
    assert removed == ["fedfms."]
    assert resources["class_allow_list"][0] == "nvflare.app_common.workflows.fedavg.FedAvg"  # provisioned kept
    assert "fedfms." not in resources["class_allow_list"] and EXECUTOR in resources["class_allow_list"]
    assert resources["class_list_enforcement_mode"] == "enforce"
    assert [c["id"] for c in resources["components"]] == ["resource_manager", "fedfms_job_guard"]
    site_setup.add_class_allow_list(kit)  # a second run changes nothing
    assert json.loads(path.read_text()) == resources
    for bad in (["fedfms."], ["fedfms.deploy.site_setup.add_class_allow_list"], ["subprocess.run"]):
        with pytest.raises(ValueError, match="prefix|not a class"):
            site_setup.add_class_allow_list(kit, bad)


def test_server_setup_gives_nobody_the_byoc_right_by_default(tmp_path):
    kit = _kit(tmp_path)
    (kit / "local" / "authorization.json.default").write_text(json.dumps({"format_version": "1.0", "permissions": {
        "project_admin": "any", "lead": {"submit_job": "any", "byoc": "any"}, "member": {"view": "any"}}}))
    assert site_setup.main(["server", str(kit), "--no-allow-list"]) == 0
    policy = json.loads((kit / "local" / "authorization.json").read_text())["permissions"]
    assert policy["lead"]["byoc"] == "none" and policy["project_admin"]["byoc"] == "none"
    assert policy["project_admin"]["submit_job"] == "any" and "byoc" not in policy["member"]
    assert site_setup.main(["server", str(kit), "--no-allow-list", "--byoc-roles", "lead"]) == 0
    assert json.loads((kit / "local" / "authorization.json").read_text())["permissions"]["lead"]["byoc"] == "any"


def _check(kit, path, args, site_file=None, site="hospital-a"):
    return check_component(path, args, site=site, run_dir=kit / "job1", kit_root=kit, site_file=site_file or {})


def test_guard_refuses_arguments_that_reach_the_kit_or_leave_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDFMS_DATA_ROOT", raising=False)
    monkeypatch.delenv("FEDFMS_SAM_CHECKPOINT", raising=False)
    kit = _kit(tmp_path)
    data = tmp_path / "pacs" / "prepared"
    (data / "hospital-a").mkdir(parents=True)
    site = {"data_dir": str(data / "hospital-a"), "data_root": str(data)}
    persistor = "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"
    # the shipped jobs pass
    for name in ("fedmsa", "fedsam_l", "fedmsa_tiny", "fednnunet_tiny"):
        for config in render_job(name).values():
            for path, args in ((c.get("path"), c.get("args") or {}) for c in _components(config)):
                assert _check(kit, path, args, site) is None, (name, path)
    # the attack: a function's argument pointing at the kit
    assert "the kit itself" in _check(kit, "fedfms.deploy.site_setup.add_class_allow_list",
                                          {"kit": str(kit), "prefixes": ["subprocess."]})
    assert "the kit itself" in _check(kit, persistor, {"global_model_file_name": str(kit / "local" / "resources.json")})
    assert "run folder" in _check(kit, persistor, {"global_model_file_name": "/etc/cron.d/x"})
    assert "run folder" in _check(kit, "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
                                  {"tb_folder": str(tmp_path / "elsewhere")})
    assert "relative path" in _check(kit, persistor, {"global_model_file_name": "../local/resources.json"})
    assert "environment" in _check(kit, persistor, {"global_model_file_name": "$HOME/x"})
    assert _check(kit, persistor, {"global_model_file_name": str(kit / "job1" / "app_server" / "m.pt")}) is None
    assert _check(kit, persistor, {"global_model_file_name": "m.pt"}) is None  # a plain name: its own folder
    # executor paths: only inside the site's own folders, symbolic links followed
    assert "outside this site's" in _check(kit, EXECUTOR, {"data_dir": "/etc", "model_config": {}}, site)
    assert "outside this site's" in _check(kit, EXECUTOR, {"data_dir": str(kit / "startup")}, site)
    assert _check(kit, EXECUTOR, {"data_dir": str(data / "{site_name}")}, site) is None
    (data / "link").symlink_to(kit / "startup")
    assert "outside this site's" in _check(kit, EXECUTOR, {"data_dir": str(data / "link")}, site)
    assert "outside this site's" in _check(kit, EXECUTOR, {"model_config": {"checkpoint": str(tmp_path / "x.pth")}}, site)
    assert "names no" in _check(kit, EXECUTOR, {"data_dir": "/data/x"}, {})
    # a resumed run reads the previous run's folder in the server's workspace, never the kit's private folders
    monitor = "fedfms.flare.monitor.FederationMonitor"
    assert _check(kit, monitor, {"resume": {"record": str(kit / "job0" / "fedfms_run.json")}}, site="server") is None
    assert "the kit itself" in _check(kit, monitor, {"resume": {"record": str(kit / "startup" / "x")}}, site="server")
    assert "server's workspace" in _check(kit, persistor, {"source_ckpt_file_full_name": "/etc/passwd"}, site="server")


def _components(config):
    from fedfms.flare.jobs import components

    return [{"path": p, "args": a} for p, a in components(config)]


def test_executor_confines_job_paths_to_the_sites_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDFMS_DATA_ROOT", raising=False)
    monkeypatch.delenv("FEDFMS_SAM_CHECKPOINT", raising=False)
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps({"data_root": "/data/fl", "checkpoint_dir": "/models"}))
    s = resolve_site_settings("HK", {"data_dir": "/data/fl/{site_name}", "checkpoint": "/models/sam.pth"}, tmp_path)
    assert (s["data_dir"], s["checkpoint"]) == ("/data/fl/HK", "/models/sam.pth")
    with pytest.raises(ConfigError, match=r"data_dir '/etc' is outside this site's"):
        resolve_site_settings("HK", {"data_dir": "/etc"}, tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoint '/root/.ssh/id_rsa' is outside"):
        resolve_site_settings("HK", {"data_dir": "/data/fl/HK", "checkpoint": "/root/.ssh/id_rsa"}, tmp_path)
    with pytest.raises(ConfigError, match="relative path"):
        resolve_site_settings("HK", {"data_dir": "../../etc"}, tmp_path)
    # also when the site's own data_dir would replace the job's: such a job is refused, not silently corrected
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps({"data_dir": "/mnt/hk"}))
    with pytest.raises(ConfigError, match="outside"):
        resolve_site_settings("HK", {"data_dir": "/opt/kit/startup"}, tmp_path)
    # the package's own weights (the demo's pretrained tiny SAM) are readable everywhere
    from fedfms.flare.site_config import PACKAGE_ASSETS

    asset = str(PACKAGE_ASSETS / "sam_tiny_synthetic.pth")
    assert resolve_site_settings("HK", {"checkpoint": asset}, tmp_path)["checkpoint"] == asset
