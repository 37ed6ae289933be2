"""``fedfms loso`` on FLARE: the federated half of each leave-one-site-out fold, run in FLARE's simulator.

The protocol itself (checks, fold records, scoring, the centralised baseline, results files) is FLARE-free in
:mod:`fedfms.evaluation.loso`; this module gives it a :class:`SimulatorFederation`, which writes each fold's job
from its recipe (``fedfms.flare.jobs``: the variant, or the recipe a ``fedfms job new`` folder keeps in its
meta.json, with the fold's training sites and rounds) and runs ``fedfms simulate`` in a child process.

A job folder written by hand (no recipe in its meta.json) cannot be written again for a fold's sites and rounds,
so ``loso`` refuses it with a one-line error; ``evaluate --job`` and ``centralized --job`` still read its model and
train config (``centralized`` then needs ``--epochs``: such a job has no recipe to give its rounds)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from fedfms.errors import ConfigError
from fedfms.evaluation.loso import GLOBAL_MODEL, run_loso
from fedfms.evaluation.results import EvaluationError
from fedfms.flare.jobs import VARIANTS, job_model_config, job_personalise, job_recipe, job_train_config, variant_settings
from fedfms.flare.fed_job import rewrite_job, write_job
from fedfms.processes import stop_group
from fedfms.flare.simulate import server_job_dir
from fedfms.flavours import apply_flavour, flavour_of
from fedfms.nnunet.config import NNUNET_VARIANT
from fedfms.run_record import read_run_record, summarize
from fedfms.flare.site_forkserver import ForkedProcess, ensure_fork_server

log = logging.getLogger(__name__)

PROGRESS_LINE = re.compile(r"^round \d+(/\d+)?  ")  # the federation monitor's one line per round


# ----------------------------------------------------------------------------------------------------
# where a fold's job comes from: a variant of fedfms.flare.jobs, or a job folder with its recipe


@dataclass
class JobSource:
    """A job variant name (overrides allowed) or a job folder (its own settings; written again from its recipe
    with the fold's rounds and sites)."""

    label: str
    variant: str | None = None
    job_dir: Path | None = None
    train_overrides: dict = field(default_factory=dict)
    model_overrides: dict = field(default_factory=dict)
    recipe: tuple[str, dict] | None = None  # job_dir's (variant, settings); None for a job written by hand

    def settings(self) -> dict:
        """``{"model", "train", "num_rounds"}`` (``num_rounds`` None for a job written by hand)."""
        if self.variant:
            s = variant_settings(self.variant, train=self.train_overrides or None, model=self.model_overrides or None)
            return {"model": s["model"], "train": s["train"], "num_rounds": s["num_rounds"]}
        rounds = variant_settings(self.recipe[0], **self.recipe[1])["num_rounds"] if self.recipe else None
        return {"model": job_model_config(self.job_dir), "train": job_train_config(self.job_dir), "num_rounds": rounds}

    def check_recipe(self) -> None:
        """A fold's job is written from a recipe; a job folder written by hand has none."""
        if self.job_dir is not None and self.recipe is None:
            raise ConfigError(f"{self.job_dir}: written by hand (its meta.json has no recipe), and loso writes each fold's job "
                              "from the recipe with the fold's sites and rounds; make the job with 'fedfms job new' or pass a variant")

    def write(self, out_dir: Path, rounds: int, sites: Sequence[str]) -> Path:
        """The fold's job: these training sites, all expected in every round, for ``rounds`` rounds."""
        if self.variant:
            return write_job(self.variant, out_dir, num_rounds=rounds, sites=list(sites),
                             train=self.train_overrides or None, model=self.model_overrides or None)
        self.check_recipe()
        return rewrite_job(self.job_dir, out_dir, num_rounds=rounds, sites=list(sites))


def job_source(variant_or_job: str | os.PathLike, train_overrides: Mapping | None = None,
               model_overrides: Mapping | None = None, flavour: str | None = None) -> JobSource:
    """``flavour`` (``fedfms.flavours``): for a variant, its fields join the overrides; a job folder keeps the
    flavour it was made with, and asking for another one is refused."""
    name = str(variant_or_job)
    if name in VARIANTS:
        model, train = dict(model_overrides or {}), dict(train_overrides or {})
        variant = model.get("variant") or VARIANTS[name]["model"]["variant"]
        if flavour and variant == NNUNET_VARIANT:
            # nnU-Net has no flavours: the renderer refuses any but the default, which changes nothing
            variant_settings(name, flavour=flavour)
        elif flavour:
            model, train = apply_flavour(flavour, model, train, variant=variant)
        return JobSource(name, variant=name, train_overrides=train, model_overrides=model)
    path = Path(name)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"{name!r} is neither a job variant ({', '.join(VARIANTS)}) nor a FLARE job folder (no meta.json)")
    if train_overrides or model_overrides:
        raise ConfigError(f"{path}: train/model overrides apply to job variants; for a job folder, make one with the "
                          "settings you want ('fedfms job new')")
    source = JobSource(str(path.resolve()), job_dir=path.resolve(), recipe=job_recipe(path))
    if flavour:
        settings = source.settings()
        has = flavour_of(settings["model"], settings["train"])
        if has != flavour:
            raise ConfigError(f"{path}: the job's flavour is {has!r}, not {flavour!r}; a job folder keeps its own settings "
                              "(make one with the flavour you want, or pass a job variant)")
    return source


def training_settings(variant_or_job: str | os.PathLike, train_overrides: Mapping | None = None,
                      model_overrides: Mapping | None = None, flavour: str | None = None) -> dict:
    """``{"model", "train", "num_rounds"}`` of a variant or job folder with the overrides (and the fields of
    ``flavour``) merged in (for training outside FLARE, where nothing has to be written back into a job).
    ``num_rounds`` is None for a job folder written by hand."""
    name = str(variant_or_job)
    if name in VARIANTS:
        return job_source(name, train_overrides, model_overrides, flavour).settings()
    s = job_source(name).settings()
    model, train = {**s["model"], **dict(model_overrides or {})}, {**s["train"], **dict(train_overrides or {})}
    if flavour:
        model, train = apply_flavour(flavour, model, train)
    return {"model": model, "train": train, "num_rounds": s["num_rounds"]}


# ----------------------------------------------------------------------------------------------------
# one fold's federation: FLARE's simulator in a child process


def simulate(job: Path, workspace: Path, clients: Sequence[str], data_root: Path, log_path: Path,
             say: Callable[[str], None] | None = None, verbose: bool = False) -> int:
    """Run the FLARE simulator in a child process (``fedfms simulate --quiet``) with its output in ``log_path``:
    each fold starts from a clean FLARE state. ``say`` gets the federation's one line per round (everything with
    ``verbose``); FLARE's full logs are in the workspace (``server/log.txt`` and each site's ``log.txt``)."""
    cmd = [sys.executable, "-m", "fedfms.cli", "simulate", str(job), "--workspace", str(workspace),
           "--clients", ",".join(clients), "--data-root", str(data_root), "--verbose" if verbose else "--quiet"]
    with open(log_path, "w") as out:
        proc = _start_fold_process(cmd)
        try:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if say and (verbose or PROGRESS_LINE.match(line)):
                    say(f"  {line.rstrip()}")
            return proc.wait()
        except BaseException:
            stop_group(proc)
            raise


def _start_fold_process(cmd: list[str]) -> subprocess.Popen | ForkedProcess:
    """The fold's ``fedfms simulate`` process, in a session of its own (an interrupt ends its group), its output on a
    pipe: forked from the fork server, which every fold's sites fork from too (its address is in the child's
    environment), so a fold does not pay torch's, FLARE's and MONAI's imports again (~4 CPU-s); started plainly if
    the fork server is off or refuses it."""
    server = ensure_fork_server()
    if server is not None:
        try:  # a fork is a session leader already (site_forkserver._become)
            return ForkedProcess(server.address, cmd, dict(os.environ), os.getcwd(), capture_output=True)
        except (OSError, ValueError) as exc:
            log.info("fold process started plainly: %s", exc)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, text=True, errors="replace", bufsize=1)


def tail(path: Path, lines: int = 3) -> str:
    """The last non-empty ``lines`` of a log, on one line."""
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(line.strip()[:160] for line in text[-lines:])


@dataclass
class SimulatorFederation:
    """:class:`fedfms.evaluation.loso.Federation` on FLARE's simulator: ``<fold>/job``, ``<fold>/simulator``,
    ``<fold>/simulator.log``."""

    source: JobSource
    verbose: bool = False

    @property
    def label(self) -> str:
        return self.source.label

    @property
    def train_overrides(self) -> dict:
        return self.source.train_overrides

    @property
    def model_overrides(self) -> dict:
        return self.source.model_overrides

    def settings(self) -> dict:
        self.source.check_recipe()
        return self.source.settings()

    def write(self, fold: Path, train_sites: list[str], rounds: int) -> dict:
        job = self.source.write(fold / "job", rounds, train_sites)
        return {"model": job_model_config(job), "train": job_train_config(job), "personalise": job_personalise(job)}

    def run(self, fold: Path, train_sites: list[str], data_root: Path, say: Callable[[str], None]) -> Path:
        log_path = fold / "simulator.log"
        rc = simulate(fold / "job", fold / "simulator", train_sites, data_root, log_path, say=say, verbose=self.verbose)
        server = server_job_dir(fold / "simulator")
        problem = f"exit code {rc}" if rc != 0 else None
        run_record = read_run_record(server)
        if problem and run_record is not None:  # the federation's own account: which site missed which round, why
            problem += f": {' / '.join(line.strip() for line in summarize(run_record).splitlines())}"
        if problem is None and not (server / "app_server" / GLOBAL_MODEL).is_file():
            problem = f"no {GLOBAL_MODEL} was written"
        if problem:
            last = tail(log_path)
            raise EvaluationError(f"fold {fold.name}: the simulation failed ({problem}); see {log_path}"
                                  + (f" (last lines: {last})" if last else "") + "; rerun this fold with --overwrite",
                                  summary=f"simulation failed ({problem})")
        return server / "app_server"


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def leave_one_site_out(
    variant_or_job: str | os.PathLike,
    data_root: str | os.PathLike,
    sites: Sequence[str] | None,
    workspace: str | os.PathLike,
    rounds: int | None = None,
    holdouts: Sequence[str] | None = None,
    centralized: bool = False,
    train_overrides: Mapping | None = None,
    model_overrides: Mapping | None = None,
    overwrite: bool = False,
    checkpoint: str | None = None,
    batch_size: int = 6,
    device: str = "auto",
    log: Callable[[str], None] | None = print,
    flavour: str | None = None,
    scoring: str = "honest",
    verbose: bool = False,
) -> list[dict]:
    """Run the LOSO folds for ``holdouts`` (default: every site) and return the table rows.

    ``variant_or_job``: a job variant, or a job folder made by ``fedfms job new`` (one written by hand is refused:
    each fold's job is written from the recipe). ``sites``: site names, each a prepared folder ``data_root/<site>``
    (None: every site folder there). ``rounds``: federated rounds (default: the job's); the centralised baseline
    trains ``rounds x local epochs`` epochs. ``checkpoint``: the SAM checkpoint, passed to the simulated sites
    as ``FEDFMS_SAM_CHECKPOINT`` (what the jobs' checkpoint setting refers to) and used for scoring.
    An existing fold folder is never replaced unless ``overwrite``. ``flavour`` (``fedfms.flavours``, for a
    variant): its config fields join the overrides. ``scoring`` (honest, reference, both): which rule the
    printed table and the CSV show; every score of both rules is kept in the JSON whatever it is. ``verbose``: the
    log gets everything the simulator prints (FLARE's INFO log), not only its one line per round.

    Each row: ``method``, ``label``, ``sites`` (held-out site -> scores), the averages over those sites of
    dice/iou/volume_dice/volume_iou and of the paper code's dice_reference/iou_reference, ``num_folds``."""
    with _env(FEDFMS_SAM_CHECKPOINT=checkpoint):
        federation = SimulatorFederation(job_source(variant_or_job, train_overrides, model_overrides, flavour), verbose)
        return run_loso(federation, data_root, sites, workspace, rounds, holdouts, centralized, overwrite,
                        batch_size, device, log, scoring)
