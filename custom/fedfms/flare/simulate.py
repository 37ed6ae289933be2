"""Run a job in FLARE's simulator with this project's site policy and data location, and tell the truth
about the outcome (from the run record the server's federation monitor writes)."""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedfms.capacity import Placement, choose_placement, fork_server_gib
from fedfms.data.site_dataset import patient_split, read_manifest
from fedfms.data.site_warnings import TRAIN_DEFAULTS, site_warnings
from fedfms.errors import ConfigError, DataError
from fedfms.evaluation.personal import personal_gaps, read_personal_record
from fedfms.flare.fed_job import class_allow_list, render_job, rewrite_job
from fedfms.flare.he_job import prepare_simulation
from fedfms.flare.jobs import executor_args, job_model_config, job_recipe, job_train_config
from fedfms.flare.liveness import SIMULATED
from fedfms.flare.monitor import PROGRESS_LOGGER
from fedfms.flare.site_forkserver import SubprocessWithForkedSites, enabled as forking_enabled, ensure_fork_server
from fedfms.ports import PortDrawer
from fedfms.flare.site_config import DEFAULT_CHECKPOINT, DEFAULT_DATA_DIR, SITE_CONFIG_FILE, read_site_config
from fedfms.run_record import EXIT_FAILED, EXIT_GAPS, EXIT_OK, exit_code, read_run_record, summarize


def prepare_sim_workspace(workspace: str | Path, job_dir: str | Path | None = None,
                          data_root: str | Path | None = None) -> Path:
    """FLARE 2.9's simulator enforces a component allow-list for jobs without custom code; give the
    simulated sites the same ``local/resources.json`` policy a hospital would set. The simulated sites' own
    ``local/fedfms_site.json`` names the folders their job may read (fedfms.flare.site_config): ``data_root`` and the
    job's own data and checkpoint locations, since whoever runs the simulator owns both."""
    local = Path(workspace) / "local"
    local.mkdir(parents=True, exist_ok=True)
    resources = local / "resources.json"
    current = json.loads(resources.read_text()) if resources.is_file() else {"format_version": 2}
    current["class_allow_list"] = class_allow_list()
    resources.write_text(json.dumps(current, indent=2))
    site_file = local / SITE_CONFIG_FILE
    settings = read_site_config(local)
    data_roots = [str(Path(data_root).resolve())] if data_root is not None else []
    checkpoint_dirs = []
    if job_dir is not None:
        _, args = executor_args(job_dir)
        data_dir, checkpoint = args.get("data_dir"), (args.get("model_config") or {}).get("checkpoint")
        if data_dir and data_dir != DEFAULT_DATA_DIR and "$" not in data_dir:
            data_roots.append(str(Path(data_dir.split("{site_name}")[0] or "/").expanduser().resolve()))
        if checkpoint and checkpoint != DEFAULT_CHECKPOINT and "$" not in checkpoint:
            checkpoint_dirs.append(str(Path(checkpoint).expanduser().resolve().parent))
    for key, extra in (("data_root", data_roots), ("checkpoint_dir", checkpoint_dirs)):
        if extra:
            have = settings.get(key) or []
            settings[key] = list(dict.fromkeys(([have] if isinstance(have, str) else have) + extra))
    if settings:
        site_file.write_text(json.dumps(settings, indent=2))
    return Path(workspace)


def quiet_log_config(workspace: str | Path) -> Path:
    """FLARE's own logging with a quiet console: one progress line per round from the server's federation monitor
    (logger ``fedfms.progress``, the bare message), and warnings and errors without FLARE's context prefix. The full
    INFO logs still go to each participant's ``log.txt`` in the workspace."""
    from nvflare.fuel.utils.log_utils import default_log_dict

    config = copy.deepcopy(default_log_dict)
    config["formatters"]["fedfmsConcise"] = {"format": "%(levelname)s %(name)s: %(message)s"}
    config["formatters"]["fedfmsBare"] = {"format": "%(message)s"}
    config["handlers"]["consoleHandler"].update(level="WARNING", formatter="fedfmsConcise")
    config["handlers"]["fedfmsProgress"] = {"class": "logging.StreamHandler", "level": "INFO", "formatter": "fedfmsBare",
                                            "stream": "ext://sys.stdout"}
    # propagates to the root's file handlers too (its console handler stops INFO: the line is printed once)
    config["loggers"][PROGRESS_LOGGER] = {"level": "INFO", "handlers": ["fedfmsProgress"], "propagate": True}
    # FedAvg here weighs by sample counts, not by per-site aggregation_weights: FLARE's notice about them is noise
    config["loggers"]["nvflare.app_common.aggregators.dxo_aggregator"] = {"level": "ERROR"}
    # bitsandbytes (under FLARE's float16 quantisation filters) on its optional 4-bit CPU kernels: not used here
    config["loggers"]["bitsandbytes.backends.cpu.ops"] = {"level": "ERROR"}
    path = Path(workspace) / "local" / "fedfms_quiet_log_config.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def job_for_clients(job_dir: str | Path, workspace: str | Path, clients: list[str]) -> Path:
    """The job as this run needs it: its recipe rendered again for exactly these sites (every one is expected in
    every round). No timeout is derived here: a round waits as long as its sites report progress
    (``fedfms.flare.liveness``), also when the simulator trains the sites of a round in turn. A hand-written job is
    used as it is."""
    job_dir = Path(job_dir)
    recipe = job_recipe(job_dir)
    if recipe is None or not matches_recipe(job_dir, *recipe):
        return job_dir  # written or edited by hand: its own min_clients and timeouts apply
    _, settings = recipe
    if settings.get("sites") and sorted(settings["sites"]) != sorted(clients):
        raise ConfigError(f"{job_dir}: the job names sites {settings['sites']}, but the simulation runs {clients}; "
                          "pass --clients with the job's sites")
    # under local/: the simulator clears the rest of its workspace when it starts
    return rewrite_job(job_dir, Path(workspace) / "local" / "fedfms_job", overwrite=True, sites=list(clients))


def matches_recipe(job_dir: Path, variant: str, settings: dict) -> bool:
    """Whether the job folder is exactly what its recipe renders (not edited by hand since)."""
    try:
        rendered = render_job(variant, **settings)
    except ConfigError:
        return False
    on_disk = {p.relative_to(job_dir).as_posix() for p in job_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    if on_disk != set(rendered):
        return False
    try:
        return all(json.loads((job_dir / rel).read_text()) == content for rel, content in rendered.items())
    except (OSError, json.JSONDecodeError):
        return False


@dataclass
class Outcome:
    exit_code: int
    summary: str
    record: dict | None


def simulation_outcome(workspace: str | Path, flare_rc: int) -> Outcome:
    record = read_run_record(server_job_dir(workspace))
    if record is None:
        code = EXIT_FAILED if flare_rc != 0 else EXIT_OK
        return Outcome(code, "" if code == EXIT_OK else f"FLARE's simulator exited with {flare_rc}", None)
    code = exit_code(record)
    if flare_rc != 0 and code == EXIT_OK:
        code = EXIT_FAILED
    summary = summarize(record)

    gaps = personal_gaps(read_personal_record(server_job_dir(workspace)))
    if gaps:  # a personalised job in which some site ended without its personalised model
        code = EXIT_GAPS if code == EXIT_OK else code
        summary += "".join(f"\n  {gap}" for gap in gaps)
    return Outcome(code, summary, record)


def run_simulation(job_dir: str | Path, workspace: str | Path, clients: list[str], data_root: str | Path | None = None,
                   threads: int | None = None, quiet: bool = False) -> int:
    """Simulate ``job_dir`` with the named clients; ``data_root/<client>`` is each site's data unless the job
    or a site config says otherwise. ``quiet``: only warnings and per-round progress on the console.

    Returns 0 when every round averaged every site, 3 when the run finished but some site missed some round,
    1 when it stopped early or FLARE failed (:func:`simulate` also says why)."""
    return simulate(job_dir, workspace, clients, data_root, threads, quiet).exit_code


# Seconds a simulated site process may take to start and reach the server. FLARE's default (60 s) is too short
# when many site processes start at once on a few cores: the site's task is then lost ("cannot sync with
# server Runner after 60.0 seconds") and the round misses it.
SITE_START_TIMEOUT_S = 600


_TURN = threading.local()  # the site whose process a simulator thread is running


def _simulator_runner_class():
    from nvflare import SimulatorRunner  # FLARE's public simulator entry (nvflare/__init__.py)

    class Runner(SimulatorRunner):
        def _generate_args(self, *args, **kwargs):
            parsed = super()._generate_args(*args, **kwargs)
            parsed.set = [*getattr(parsed, "set", []), f"simulator_worker_timeout={SITE_START_TIMEOUT_S}"]
            return parsed

    return Runner


def _watched_client_runner_class(base):
    """FLARE's ``SimulatorClientRunner`` (it starts and drives the site processes), telling the server's federation
    monitor (same process: ``fedfms.flare.liveness.SIMULATED``) when a site's turn starts and when its process
    exits abnormally. FLARE itself only logs "Communication error with client" and the round waits for ever."""

    class WatchedClientRunner(base):
        # FLARE's do_one_task writes the site's name into the one build_ctx dict its threads share, then sends that
        # dict to the site's new process: two sites starting at once could both be told the same name (a fresh-clone
        # `make test`: site-2's process ran as site-1 and the run waited for ever). Each thread gets its own copy.
        @property
        def build_ctx(self):
            mine = getattr(self._build_ctx_per_thread, "ctx", None)
            if mine is None:
                mine = self._build_ctx_per_thread.ctx = copy.copy(self._shared_build_ctx)
            return mine

        @build_ctx.setter
        def build_ctx(self, value):
            self._shared_build_ctx = value
            self._build_ctx_per_thread = threading.local()

        def do_one_task(self, client, *args, **kwargs):
            _TURN.process = None
            SIMULATED.turn_started(client.client_name)
            try:
                result = super().do_one_task(client, *args, **kwargs)
            finally:
                SIMULATED.turn_ended(client.client_name)
            # FLARE returns (True, None, site) when the site's process died or its pipe broke ("Subprocess died",
            # "Communication error"); a turn that ends normally names the next client to run
            process = _TURN.process
            if isinstance(result, tuple) and len(result) == 3 and result[1] is None and process is not None:
                SIMULATED.exited(client.client_name, process.returncode if process.returncode is not None else -1)
            return result

        def _cleanup_process(self, process, *args, **kwargs):
            _TURN.process = process  # FLARE ends it if it still runs; its return code is then known
            return super()._cleanup_process(process, *args, **kwargs)

    return WatchedClientRunner


@contextmanager
def watched_site_processes(fork_sites: bool = True):
    """While a simulation runs: FLARE's simulator builds its client runner from this module attribute (FLARE has
    no hook for the site processes' exits), so it is swapped for the watched subclass and put back afterwards.

    The simulator also asks the module's ``get_open_ports`` (the kernel, through port 0) for the port each site
    process will listen on; that is swapped for :class:`fedfms.ports.PortDrawer`: ports below the kernel's ephemeral
    range that no two of the simulator's threads share (fedfms/ports.py says what happened otherwise).

    And with ``fork_sites`` the site processes are forked from this process's fork server, which has already imported
    what a site imports, instead of each importing it again (:mod:`fedfms.flare.site_forkserver`). Not for sites on
    GPUs: a fork must not inherit a CUDA driver an import may have touched, and there the imports are small beside
    the training. Not when the sites take turns either (their processes are started again for each task): in the
    full-size rehearsal (ViT-B FedSAM on a CPU, two sites in turn), a forked site's process, up a few seconds after
    the previous one ended instead of the ~15 s a plain one takes to import, waited 600 s for the first chunk of its
    357 MB model download (FLARE's retry then fetched it in 2 s). Until that race in FLARE's download service is
    understood, such runs start their sites as FLARE does."""
    from nvflare.private.fed.app.simulator import simulator_runner as flare_simulator

    original, original_ports = flare_simulator.SimulatorClientRunner, flare_simulator.get_open_ports
    original_subprocess = flare_simulator.subprocess
    flare_simulator.SimulatorClientRunner = _watched_client_runner_class(original)
    flare_simulator.get_open_ports = PortDrawer().open_ports
    flare_simulator.subprocess = SubprocessWithForkedSites(ensure_fork_server() if fork_sites else None)
    SIMULATED.activate()
    try:
        yield
    finally:
        flare_simulator.SimulatorClientRunner = original
        flare_simulator.get_open_ports = original_ports
        flare_simulator.subprocess = original_subprocess


def largest_batch(train: dict, data_root: str | Path | None, clients: list[str]) -> int:
    """The most samples one training step of any site holds: the job's batch, or fewer when every site has fewer
    training samples (what the memory of a site process grows with)."""
    batch = int(train.get("batch_size", 6))
    if data_root is None:
        return batch

    most = 0
    for client in clients:
        try:
            m = read_manifest(Path(data_root) / client)
        except DataError:
            return batch  # the site itself will say why it cannot start
        train_idx, _ = patient_split(m.volumes, train.get("val_fraction", TRAIN_DEFAULTS["val_fraction"]),
                                     train.get("split_seed", TRAIN_DEFAULTS["split_seed"]))
        most = max(most, len(train_idx))
    return max(1, min(batch, most)) if most else batch


def placement_for(job_dir: str | Path, num_sites: int, threads: int | None = None, gpus: list[int] | None = None,
                  data_root: str | Path | None = None, clients: list[str] | None = None,
                  forked: bool = False) -> Placement:
    """How many of the job's sites train at once, and on which GPUs (see fedfms.capacity); ``forked``: the site
    processes are forked from the fork server, whose pages they share."""
    model, train = job_model_config(job_dir), job_train_config(job_dir)
    device = str(train.get("device", "auto"))
    return choose_placement(num_sites, model.get("variant", "vit_b"), model.get("mode", "fedmsa"),
                            device="cpu" if device == "cpu" else "auto",
                            batch_size=largest_batch(train, data_root, clients or []),
                            checkpointing=bool(model.get("activation_checkpointing")), threads=threads, gpus=gpus,
                            forked_from_gib=fork_server_gib() if forked else 0.0)


def site_placement(job_dir: str | Path, clients: list[str], threads: int | None = None, gpus: list[int] | None = None,
                   data_root: str | Path | None = None) -> tuple[Placement, bool]:
    """The placement of a simulation's sites, and whether their processes are forked from the fork server: only
    when every site runs at once on the CPU, each in one process for the whole run (:func:`watched_site_processes`).
    Forked sites share the fork server's imported pages, so all of them may fit at once where plain processes,
    each holding its own copy, would have to take turns (16 tiny sites: ~0.2 GB private each, measured, against
    ~0.6 GB for a plain process)."""
    plain = placement_for(job_dir, len(clients), threads, gpus, data_root, clients)
    if plain.gpus or not forking_enabled():
        return plain, False
    if plain.fits and plain.simulator_threads >= len(clients):
        return plain, True
    forked = placement_for(job_dir, len(clients), threads, gpus, data_root, clients, forked=True)
    if forked.fits and forked.simulator_threads >= len(clients):
        return forked, True
    return plain, False


def simulate(job_dir: str | Path, workspace: str | Path, clients: list[str], data_root: str | Path | None = None,
             threads: int | None = None, quiet: bool = False, gpus: list[int] | None = None, echo=print) -> Outcome:
    _Runner = _simulator_runner_class()

    if not clients:
        raise ConfigError("no clients to simulate; expected --clients A,B,...")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads is {threads}; expected a positive number of sites to train at once")
    if data_root is not None:  # what check-site would warn about, before anything starts
        if not Path(data_root).is_dir():
            raise DataError(f"{data_root}: --data-root does not exist; expected a folder with one prepared site folder "
                            f"per --clients name")
        missing = [c for c in clients if not (Path(data_root) / c).is_dir()]
        if missing:  # nothing starts (and no workspace is made) for a federation that cannot run
            found = ", ".join(sorted(p.name for p in Path(data_root).iterdir() if p.is_dir())) or "none"
            raise DataError(f"{data_root}: no site folder for client(s) {', '.join(missing)}; expected one prepared site "
                            f"folder per --clients name (found: {found})")
    placement, fork_sites = site_placement(job_dir, clients, threads, gpus, data_root)
    if not placement.fits:  # refused before anything starts, with what would fit
        raise ConfigError(placement.reason)
    echo(placement.reason + (f"; GPUs {placement.gpu_arg}" if placement.gpus else ""))
    if data_root is not None:
        for client in clients:
            for line in site_warnings(Path(data_root) / client, job_train_config(job_dir), job_model_config(job_dir)):
                echo(f"warning: {line}")
    prepare_sim_workspace(workspace, job_dir, data_root)
    prepare_simulation(workspace, job_dir)  # an HE job: TenSEAL contexts in the simulator's startup/ (fedfms.flare.he_job)
    job = job_for_clients(job_dir, workspace, clients)
    runner = _Runner(
        job_folder=str(job), workspace=str(workspace), clients=",".join(clients),
        threads=placement.simulator_threads, gpu=placement.gpu_arg,
        log_config=str(quiet_log_config(workspace)) if quiet else None,
    )
    before = os.environ.get("FEDFMS_DATA_ROOT")
    if data_root is not None:  # the jobs' default data_dir, $FEDFMS_DATA_ROOT/{site_name}, for the simulated sites
        os.environ["FEDFMS_DATA_ROOT"] = str(Path(data_root).resolve())
    try:
        with watched_site_processes(fork_sites=fork_sites):
            flare_rc = runner.run()
        return simulation_outcome(workspace, flare_rc)
    finally:
        if before is None:
            os.environ.pop("FEDFMS_DATA_ROOT", None)
        else:
            os.environ["FEDFMS_DATA_ROOT"] = before


def server_job_dir(workspace: str | Path) -> Path:
    return Path(workspace) / "server" / "simulate_job"


def report_outcome(workspace: Path, outcome) -> int:
    """One truthful verdict after a simulation, printed for ``fedfms simulate`` and the demo: plain success only when
    every round averaged every site. Returns the exit code."""
    if outcome.exit_code == EXIT_OK:
        print(f"finished: every round averaged every site; results in {server_job_dir(workspace)}")
    else:
        verdict = "finished with gaps" if outcome.exit_code == EXIT_GAPS else "failed"
        lines = (outcome.summary or "").splitlines() or [""]
        detail = lines[0].split(": ", 1)[-1]  # the summary's first line without its "federation <status>: "
        print(f"error: simulation {verdict}: {detail}", file=sys.stderr)
        for line in lines[1:]:
            print(line, file=sys.stderr)
        print(f"(full logs: {Path(workspace) / 'server' / 'log.txt'} and each site's log.txt)", file=sys.stderr)
    return outcome.exit_code
