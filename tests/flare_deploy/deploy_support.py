"""Helpers for the deployment tests: site data, CLI calls, log checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from fedfms.deploy import runtime as rt

REPO = Path(__file__).resolve().parents[2]
POC_CLI = REPO / "poc" / "fedfms_poc.py"
TINY_JOB = REPO / "jobs" / "fedmsa_tiny"


def make_site_data(folder: Path, site: str, seed: int) -> Path:
    from fedfms.data.synthetic import make_disc_site

    return Path(make_disc_site(folder, site=site, num_volumes=4, slices_per_volume=6, image_size=128, mask_size=32,
                               seed=seed) or folder)


def run_cli(*args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a step of the POC CLI in its own interpreter, as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    res = subprocess.run([sys.executable, str(POC_CLI), *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL, env=full_env)
    if res.returncode != 0:
        raise AssertionError(f"fedfms_poc.py {' '.join(map(str, args))} failed ({res.returncode}):\n"
                             f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def site_job_log(kit_dir: Path, job_id: str) -> str:
    log = Path(kit_dir) / job_id / "log.txt"
    return log.read_text(errors="replace") if log.is_file() else ""


def logs_digest(logs: dict) -> str:
    return "\n".join(f"--- {name}\n{rt.tail(path, 25)}" for name, path in logs.items())


def localize_project(project: dict, fed_port: int, admin_port: int, server: str = "localhost") -> dict:
    """The production project.yml, moved onto loopback: server renamed to ``server`` (its certificate
    name and the address every kit connects to) and the ports replaced by free ones."""
    import copy

    project = copy.deepcopy(project)
    for p in project["participants"]:
        if p["type"] == "server":
            p["name"] = server
            p["fed_learn_port"], p["admin_port"] = fed_port, admin_port
    return project


def provision(project: dict, workspace: Path, home: Path, timeout: float = 300) -> Path:
    """``nvflare provision`` with a private HOME; returns the prod_00 folder holding the startup kits."""
    import yaml

    workspace.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    project_file = workspace.parent / f"{workspace.name}_project.yml"
    project_file.write_text(yaml.safe_dump(project, sort_keys=False))
    res = subprocess.run([sys.executable, "-m", "nvflare.cli", "provision", "-p", str(project_file),
                          "-w", str(workspace), "--force"], capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL, env=rt.site_env(home))
    prod = workspace / project["name"] / "prod_00"
    if res.returncode != 0 or not prod.is_dir():
        raise AssertionError(f"nvflare provision failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return prod


def sigkill_tree(pid: int, also_under: Path | None = None) -> list[int]:
    """SIGKILL a participant and everything it started (its job processes), as a power cut would."""
    procs = {}
    try:
        parent = psutil.Process(pid)
        procs[parent.pid] = parent
        procs.update({c.pid: c for c in parent.children(recursive=True)})
    except psutil.Error:
        pass
    if also_under is not None:
        procs.update({p.pid: p for p in rt.processes_under([also_under])})
    for p in procs.values():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(list(procs.values()), timeout=10)
    return sorted(procs)
