"""``FedFMSRecipe`` on FLARE's recipe API: it exports exactly the job ``fedfms job new`` writes (the checked-in one for a
plain variant), runs a 2-site tiny federation in FLARE's ``SimEnv`` with the project's site policy, ships its code for
FLARE's POC kits, and submits the same job through ``ProdEnv``'s session (a fake admin session here: no federation)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fedfms.errors import ConfigError
from fedfms.flare.fed_job import class_allow_list, write_job
from fedfms.flare.recipe import DATA_ROOT, FedFMSRecipe, run_outcome

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def job_files(folder: Path) -> dict[str, dict]:
    return {p.relative_to(folder).as_posix(): json.loads(p.read_text()) for p in folder.rglob("*.json")}


def tasks_as_sets(files: dict[str, dict]) -> dict[str, dict]:
    """FLARE keeps a filter chain's tasks in a set: the simulator deploys them in any order."""
    for content in files.values():
        for key in ("task_data_filters", "task_result_filters"):
            for chain in content.get(key, []):
                chain["tasks"] = sorted(chain["tasks"])
    return files


def test_the_recipe_exports_what_fedfms_job_new_writes(tmp_path):
    recipe = FedFMSRecipe("fedmsa_tiny")
    recipe.export(str(tmp_path / "plain"))
    exported = tmp_path / "plain" / "fedmsa_tiny"
    # byte for byte the checked-in job (jobs/fedmsa_tiny is `make jobs`' output)
    assert {p.relative_to(exported) for p in exported.rglob("*") if p.is_file()} == \
           {p.relative_to(JOBS / "fedmsa_tiny") for p in (JOBS / "fedmsa_tiny").rglob("*") if p.is_file()}
    for path in exported.rglob("*.json"):
        assert path.read_text() == (JOBS / "fedmsa_tiny" / path.relative_to(exported)).read_text(), path

    settings = {"sites": ["h1", "h2", "h3"], "num_rounds": 7, "privacy": "svt", "transfer": "float16", "min_sites": 2}
    FedFMSRecipe("fedmsa", **settings).export(str(tmp_path / "custom"))
    write_job("fedmsa", tmp_path / "job_new", **settings)
    assert job_files(tmp_path / "custom" / "fedmsa") == job_files(tmp_path / "job_new")
    assert job_files(tmp_path / "job_new")["meta.json"]["deploy_map"] == {"app": ["server", "h1", "h2", "h3"]}
    again = FedFMSRecipe.from_job(tmp_path / "job_new")
    assert (again.variant, again.settings) == ("fedmsa", settings)
    with pytest.raises(ConfigError, match="job variant"):
        FedFMSRecipe("fedmsa_xl")
    with pytest.raises(ConfigError, match="min_sites"):
        FedFMSRecipe("fedmsa_tiny", sites=["a"], min_sites=3)


@pytest.mark.integration
def test_the_recipe_runs_a_two_site_tiny_federation_in_simenv(tmp_path):
    from nvflare.recipe import SimEnv

    from fedfms.data.synthetic import make_disc_site

    for i, site in enumerate(["site-1", "site-2"]):
        make_disc_site(tmp_path / "data" / site, site=site, num_volumes=2 + i, slices_per_volume=3, seed=i)
    before = os.environ.get("FEDFMS_DATA_ROOT")
    recipe = FedFMSRecipe("fedmsa_tiny")  # the checked-in job, as it is
    env = SimEnv(clients=["site-1", "site-2"], workspace_root=str(tmp_path / "sim"),
                 extra={DATA_ROOT: str(tmp_path / "data")})
    outcome = run_outcome(recipe.execute(env))
    workspace = tmp_path / "sim" / "fedmsa_tiny"
    assert outcome.exit_code == 0, outcome.summary + (workspace / "server" / "log.txt").read_text()[-3000:]
    record = outcome.record
    assert record["status"] == "completed" and record["expected_sites"] == ["site-1", "site-2"]
    assert [sorted(r["accepted"]) for r in record["rounds"]] == [["site-1", "site-2"]] * 2
    assert record["sites"]["site-2"]["samples"] > record["sites"]["site-1"]["samples"] > 0
    assert os.environ.get("FEDFMS_DATA_ROOT") == before

    # the simulated sites ran with the project's allow-list (FLARE's default names no fedfms class)...
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    policy = json.loads((workspace / "local" / "resources.json").read_text())["class_allow_list"]
    assert policy == class_allow_list() and "fedfms.flare.executor.FedFMSExecutor" not in DEFAULT_CLASS_ALLOW_LIST
    # ...and the job the simulator deployed is the checked-in one
    deployed = workspace / "server" / "simulate_job" / "app_server" / "config"
    checked_in = JOBS / "fedmsa_tiny" / "app" / "config"
    for name in ("config_fed_server.json", "config_fed_client.json"):
        assert tasks_as_sets({name: json.loads((deployed / name).read_text())}) == \
               tasks_as_sets({name: json.loads((checked_in / name).read_text())}), name
    assert (workspace / "server" / "simulate_job" / "app_server" / "FL_global_model.pt").is_file()


def test_simenv_with_other_sites_than_the_job_names_is_refused_before_anything_runs(tmp_path):
    from nvflare.recipe import SimEnv

    recipe = FedFMSRecipe("fedmsa_tiny", sites=["a", "b"])
    with pytest.raises(ConfigError, match=r"names sites \['a', 'b'\], but SimEnv simulates \['site-1', 'site-2'\]"):
        recipe.run(SimEnv(num_clients=2, workspace_root=str(tmp_path)))
    with pytest.raises(ConfigError, match="expected the folder with one prepared folder per site"):
        recipe.run(SimEnv(clients=["a", "b"], workspace_root=str(tmp_path), extra={DATA_ROOT: str(tmp_path / "no")}))
    assert not (tmp_path / "fedmsa_tiny" / "server").exists()


@pytest.mark.integration
def test_flares_default_policy_refuses_the_job_and_admits_the_pocenv_form(tmp_path, monkeypatch):
    """Why the environments need the recipe's help: under FLARE's own DEFAULT_CLASS_ALLOW_LIST (what SimEnv installs,
    and what POC kits get) the production-flavour job is refused; the form the recipe makes for PocEnv (the package
    as custom code) runs under that same default policy."""
    from nvflare.recipe import PocEnv, SimEnv

    from fedfms.data.synthetic import make_disc_site

    for i, site in enumerate(["site-1", "site-2"]):
        make_disc_site(tmp_path / "data" / site, site=site, num_volumes=2, slices_per_volume=2, seed=i)
    monkeypatch.setenv("FEDFMS_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("NVFLARE_POC_WORKSPACE", str(tmp_path / "poc"))
    env = SimEnv(clients=["site-1", "site-2"], workspace_root=str(tmp_path / "plain"))
    with pytest.raises(RuntimeError, match="Simulation failed"):
        env.deploy(FedFMSRecipe("fedmsa_tiny", num_rounds=1).job)  # FLARE's SimEnv alone, no recipe hook
    log = (tmp_path / "plain" / "fedmsa_tiny" / "server" / "log.txt").read_text()
    assert "is not in allow_list" in log

    byoc = FedFMSRecipe("fedmsa_tiny", num_rounds=1)
    byoc.process_env(PocEnv(clients=["site-1", "site-2"]))
    env = SimEnv(clients=["site-1", "site-2"], workspace_root=str(tmp_path / "byoc"))
    env.deploy(byoc.job)
    local = tmp_path / "byoc" / "fedmsa_tiny" / "local"
    assert not (local / "resources.json").exists()  # SimEnv wrote FLARE's default list, and nothing else is there
    policy = json.loads((local / "resources.json.default").read_text())["class_allow_list"]
    assert "fedfms.flare.executor.FedFMSExecutor" not in policy
    from fedfms.run_record import read_run_record

    assert read_run_record(tmp_path / "byoc" / "fedmsa_tiny" / "server")["status"] == "completed"


def test_pocenv_gets_the_job_with_the_package_as_its_code(tmp_path, monkeypatch):
    """FLARE's POC kits allow stock FLARE classes only: the recipe ships the package (BYOC); the configs are unchanged."""
    from nvflare.recipe import PocEnv

    monkeypatch.setenv("NVFLARE_POC_WORKSPACE", str(tmp_path / "poc"))
    recipe = FedFMSRecipe("fedmsa_tiny", sites=["site-1", "site-2"])
    recipe.export(str(tmp_path / "out"), env=PocEnv(clients=["site-1", "site-2"]))
    job = tmp_path / "out" / "fedmsa_tiny"
    package = Path(__import__("fedfms").__file__).parent
    for app in ("app",):
        shipped = job / app / "custom" / "fedfms"
        assert (shipped / "flare" / "executor.py").read_text() == (package / "flare" / "executor.py").read_text()
        assert not list(shipped.rglob("__pycache__"))
    write_job("fedmsa_tiny", tmp_path / "production", sites=["site-1", "site-2"])
    assert job_files(job / "app" / "config") == job_files(tmp_path / "production" / "app" / "config")
    assert not (tmp_path / "poc").exists()  # preparing the job started nothing


def test_prodenv_submits_the_job_fedfms_job_new_writes(tmp_path, monkeypatch):
    """ProdEnv hands FLARE's admin session the folder ``FedJob.export_job`` writes: here a fake session keeps a copy."""
    import nvflare.recipe.session_mgr as session_mgr
    from nvflare.recipe import ProdEnv

    submitted = tmp_path / "submitted"

    class FakeSession:
        def submit_job(self, job_path):
            shutil.copytree(job_path, submitted)
            return "job-1"

        def close(self):
            pass

    monkeypatch.setattr(session_mgr, "new_secure_session", lambda **kwargs: FakeSession())
    (tmp_path / "admin_kit").mkdir()
    recipe = FedFMSRecipe("fedsam_tiny", sites=["h1", "h2"], num_rounds=3)
    run = recipe.run(ProdEnv(startup_kit_location=str(tmp_path / "admin_kit")))
    assert run.get_job_id() == "job-1"
    write_job("fedsam_tiny", tmp_path / "job_new", sites=["h1", "h2"], num_rounds=3)
    assert job_files(submitted) == job_files(tmp_path / "job_new")
    assert not (submitted / "app" / "custom").exists()  # production flavour: the sites have fedfms installed
