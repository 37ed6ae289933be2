"""Run a job in FLARE's simulator with this project's site policy and data location."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from fedfms.flare.jobs import class_allow_list


def prepare_sim_workspace(workspace: str | Path) -> Path:
    """FLARE 2.9's simulator enforces a component allow-list for jobs without custom code; give the
    simulated sites the same ``local/resources.json`` policy a hospital would set."""
    local = Path(workspace) / "local"
    local.mkdir(parents=True, exist_ok=True)
    resources = local / "resources.json"
    current = json.loads(resources.read_text()) if resources.is_file() else {"format_version": 2}
    current["class_allow_list"] = class_allow_list()
    resources.write_text(json.dumps(current, indent=2))
    return Path(workspace)


def quiet_log_config(workspace: str | Path) -> Path:
    """FLARE's own logging with the console limited to warnings, errors and this package's progress lines;
    the full INFO logs still go to each participant's ``log.txt`` in the workspace."""
    from nvflare.fuel.utils.log_utils import default_log_dict

    config = copy.deepcopy(default_log_dict)
    config["handlers"]["consoleHandler"]["level"] = "WARNING"
    config["handlers"]["fedfmsConsole"] = {**config["handlers"]["consoleHandler"], "level": "INFO"}
    config["loggers"]["fedfms"] = {"level": "INFO", "handlers": ["fedfmsConsole"], "propagate": True}
    # FedAvg here weighs by sample counts, not by per-site aggregation_weights: FLARE's notice about them is noise
    config["loggers"]["nvflare.app_common.aggregators.dxo_aggregator"] = {"level": "ERROR"}
    path = Path(workspace) / "local" / "fedfms_quiet_log_config.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def run_simulation(job_dir: str | Path, workspace: str | Path, clients: list[str], data_root: str | Path | None = None,
                   threads: int | None = None, quiet: bool = False) -> int:
    """Simulate ``job_dir`` with the named clients; ``data_root/<client>`` is each site's data unless the job
    or a site config says otherwise. ``quiet``: only warnings and per-round progress on the console.
    Returns the simulator's exit code (0 = success)."""
    from nvflare.private.fed.app.simulator.simulator_runner import SimulatorRunner

    prepare_sim_workspace(workspace)
    if data_root is not None:
        os.environ["FEDFMS_DATA_ROOT"] = str(Path(data_root).resolve())
    runner = SimulatorRunner(
        job_folder=str(job_dir), workspace=str(workspace), clients=",".join(clients),
        threads=threads or len(clients),
        log_config=str(quiet_log_config(workspace)) if quiet else None,
    )
    return runner.run()


def server_job_dir(workspace: str | Path) -> Path:
    return Path(workspace) / "server" / "simulate_job"
