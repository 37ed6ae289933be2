"""The paper's evaluation protocol: leave one site out (LOSO).

For each site k: the other sites federate (each split 9:1 into train/val by patient, as always), and the
resulting global model is scored on *every* sample of site k, which took no part in training or model
selection. Optionally the same model is trained centrally on the pooled data of the same training sites
for the same number of epochs (rounds x local epochs, i.e. the same number of passes over the data) and
scored on site k too. One row per method, one column per held-out site and the unweighted average: the
shape of the paper's Table 1.

Layout under ``workspace``::

    <holdout>/fold.json          settings, status, held-out scores of every method
    <holdout>/job/               the FLARE job the fold ran (min_clients = number of training sites)
    <holdout>/simulator/         FLARE simulator workspace; global models in server/simulate_job/app_server/
    <holdout>/simulator.log      what `fedfms simulate --quiet` printed (FLARE's full logs: simulator/*/log.txt)
    <holdout>/centralized/       model.pt (selected epoch), model_last.pt, model.json (history)
    loso_results.json, loso_results.csv   every finished fold of this experiment, rebuilt after each run

Folds can be run in separate invocations (``holdouts``): the results files gather every finished fold
whose settings (job, sites, rounds, overrides) match the current run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from fedfms.data.site_dataset import read_manifest
from fedfms.errors import CheckpointError, ConfigError, DataError, FedFMSError
from fedfms.evaluation.centralized import history_path, last_weights_path, train_centralized
from fedfms.evaluation.scoring import (ALL_SUMMARY_KEYS, PER_CLASS_KEYS, check_scoring, evaluate_sites,
                                      resolve_model_config, scoring_keys, scoring_notes)
from fedfms.flavours import apply_flavour, flavour_of
from fedfms.numbers import finite_mean, fmt_score
from fedfms.flare.jobs import VARIANTS, is_nnunet, job_model_config, job_recipe, rewrite_job, variant_settings, write_job
from fedfms.flare.simulate import server_job_dir
from fedfms.models import ModelConfig
from fedfms.run_record import read_run_record, summarize
from fedfms.training.metrics import reference_rule, reference_space
from fedfms.nnunet.config import NnUNetConfig
from fedfms.training.trainer import TrainConfig

RESULTS_JSON = "loso_results.json"
RESULTS_CSV = "loso_results.csv"
FOLD_FILE = "fold.json"
GLOBAL_MODEL = "FL_global_model.pt"
BEST_GLOBAL_MODEL = "best_FL_global_model.pt"

# method key -> what the row is. "best" models were picked on the training sites' validation data only.
METHODS = {
    "federated": "federated, final global model",
    "federated_best": "federated, best global model",
    "centralized": "centralized, best epoch",
    "centralized_last": "centralized, last epoch",
}

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class EvaluationError(FedFMSError):
    """A fold could not be completed (the simulator failed or left no global model)."""


# ----------------------------------------------------------------------------------------------------
# where a fold's job comes from: a variant of fedfms.flare.jobs, or an existing job folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def job_settings(job_dir: str | Path) -> dict:
    """``{"model", "train", "num_rounds"}`` of a job folder: what its sites train with."""
    job_dir = Path(job_dir)
    model = job_model_config(job_dir)
    client = _read_json(sorted(job_dir.glob("app*/config/config_fed_client.json"))[0])
    train = client["executors"][0]["executor"]["args"].get("train_config") or {}
    servers = sorted(job_dir.glob("app*/config/config_fed_server.json"))
    if not servers:
        raise ConfigError(f"{job_dir}: no app*/config/config_fed_server.json; expected a FLARE job folder")
    rounds = _read_json(servers[0]).get("num_rounds")
    return {"model": model, "train": train, "num_rounds": rounds}


@dataclass
class JobSource:
    """A job variant name (overrides allowed) or a job folder (used as it is, bar rounds and min_clients)."""

    label: str
    variant: str | None = None
    job_dir: Path | None = None
    train_overrides: dict = field(default_factory=dict)
    model_overrides: dict = field(default_factory=dict)

    def settings(self) -> dict:
        if self.variant:
            s = variant_settings(self.variant, train=self.train_overrides or None, model=self.model_overrides or None)
            return {"model": s["model"], "train": s["train"], "num_rounds": s["num_rounds"]}
        return job_settings(self.job_dir)

    def write(self, out_dir: Path, rounds: int, sites: Sequence[str]) -> Path:
        """The fold's job: these training sites, all expected in every round, for ``rounds`` rounds."""
        if self.variant:
            return write_job(self.variant, out_dir, num_rounds=rounds, sites=list(sites),
                             train=self.train_overrides or None, model=self.model_overrides or None)
        if job_recipe(self.job_dir) is not None:  # made by `fedfms job new`: render it again for this fold
            return rewrite_job(self.job_dir, out_dir, num_rounds=rounds, sites=list(sites))
        shutil.copytree(self.job_dir, out_dir, ignore=shutil.ignore_patterns("__pycache__"))
        _patch_job(out_dir, rounds, len(sites))
        return out_dir


def train_config(settings: Mapping, where: str = "train config") -> TrainConfig | NnUNetConfig:
    """The checked train config of ``{"model", "train"}`` settings: nnU-Net's fields for the nnU-Net baseline."""
    cls = NnUNetConfig if is_nnunet(dict(settings)) else TrainConfig
    return cls.from_dict(dict(settings["train"]), where)


def job_source(variant_or_job: str | os.PathLike, train_overrides: Mapping | None = None,
               model_overrides: Mapping | None = None, flavour: str | None = None) -> JobSource:
    """``flavour`` (``fedfms.flavours``): for a variant, its fields join the overrides; a job folder keeps the
    flavour it was made with, and asking for another one is refused."""
    name = str(variant_or_job)
    if name in VARIANTS:
        model, train = dict(model_overrides or {}), dict(train_overrides or {})
        variant = model.get("variant") or VARIANTS[name]["model"]["variant"]
        if flavour and is_nnunet({"model": {"variant": variant}}):
            # nnU-Net has no flavours: the renderer refuses any but the default, which changes nothing
            variant_settings(name, flavour=flavour)
        elif flavour:
            model, train = apply_flavour(flavour, model, train, variant=variant)
        return JobSource(name, variant=name, train_overrides=train, model_overrides=model)
    path = Path(name)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"{name!r} is neither a job variant ({', '.join(VARIANTS)}) nor a FLARE job folder (no meta.json)")
    if train_overrides or model_overrides:
        raise ConfigError(f"{path}: train/model overrides apply to job variants; for a job folder, edit it "
                          "(or make one with 'fedfms job new')")
    source = JobSource(str(path.resolve()), job_dir=path.resolve())
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
    ``flavour``) merged in (for training outside FLARE, where nothing has to be written back into a job)."""
    name = str(variant_or_job)
    if name in VARIANTS:
        return job_source(name, train_overrides, model_overrides, flavour).settings()
    s = job_source(name).settings()
    model, train = {**s["model"], **dict(model_overrides or {})}, {**s["train"], **dict(train_overrides or {})}
    if flavour:
        model, train = apply_flavour(flavour, model, train)
    return {"model": model, "train": train, "num_rounds": s["num_rounds"]}


def _patch_job(job_dir: Path, rounds: int, min_clients: int) -> None:
    """Set the rounds and the number of clients to wait for in a copy of a job written by hand."""
    meta_path = job_dir / "meta.json"
    meta = _read_json(meta_path)
    meta["min_clients"] = min_clients
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    for path in job_dir.glob("*/config/config_fed_server.json"):
        config = _read_json(path)
        config["num_rounds"], config["min_clients"] = rounds, min_clients
        # hand-written jobs may give the workflow literal values instead of "{num_rounds}" references
        for workflow in config.get("workflows", []):
            args = workflow.get("args", {})
            for key, value in (("num_rounds", rounds), ("min_clients", min_clients)):
                if isinstance(args.get(key), int):
                    args[key] = value
        path.write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------
# checks made before anything runs


def check_sites(data_root: Path, sites: Sequence[str]) -> list[str]:
    sites = list(sites)
    if len(sites) < 2:
        raise ConfigError(f"leave-one-site-out needs at least 2 sites; got {sites}")
    for s in sites:
        if not _SITE_NAME.match(s):
            raise ConfigError(f"site name {s!r}: expected letters, digits, '.', '_' or '-' (it names a FLARE client and a folder)")
    dup = sorted({s for s in sites if sites.count(s) > 1})
    if dup:
        raise ConfigError(f"site(s) {dup} listed twice")
    classes = {s: read_manifest(data_root / s).classes for s in sites}  # DataError names a missing folder
    first = sites[0]
    for s in sites[1:]:
        if classes[s] != classes[first]:
            raise DataError(f"{data_root / s}: classes {classes[s]} differ from {classes[first]} at {first}; the sites must share one task")
    return sites


def discover_sites(data_root: str | Path) -> list[str]:
    """Every prepared site folder (one with a manifest.json) directly under ``data_root``."""
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"{root}: data root does not exist; expected a folder with one prepared site per sub-folder")
    found = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())
    if not found:
        raise DataError(f"{root}: no prepared site folders (sub-folders with manifest.json); prepare them with 'fedfms prepare'")
    return found


# ----------------------------------------------------------------------------------------------------
# running one fold


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


PROGRESS_LINE = re.compile(r"^round \d+(/\d+)?  ")  # the federation monitor's one line per round
_PROGRESS_SAY: ContextVar[Callable[[str], None] | None] = ContextVar("fedfms_loso_progress", default=None)
_VERBOSE: ContextVar[bool] = ContextVar("fedfms_loso_verbose", default=False)  # echo FLARE's INFO log, not only progress


def simulate(job: Path, workspace: Path, clients: Sequence[str], data_root: Path, log_path: Path) -> int:
    """Run the FLARE simulator in a child process (``fedfms simulate --quiet``) with its output in ``log_path``:
    each fold starts from a clean FLARE state. The console (the run's ``log``) gets the federation's one line per
    round; FLARE's full logs are in the workspace (``server/log.txt`` and each site's ``log.txt``)."""
    say, verbose = _PROGRESS_SAY.get(), _VERBOSE.get()
    cmd = [sys.executable, "-m", "fedfms.cli", "simulate", str(job), "--workspace", str(workspace),
           "--clients", ",".join(clients), "--data-root", str(data_root), "--verbose" if verbose else "--quiet"]
    with open(log_path, "w") as out:
        # its own process group, so an interrupt also ends the client processes the simulator starts
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                text=True, errors="replace", bufsize=1)
        try:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if say and (verbose or PROGRESS_LINE.match(line)):
                    say(f"  {line.rstrip()}")
            return proc.wait()
        except BaseException:
            _stop_group(proc)
            raise


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return " | ".join(l.strip()[:160] for l in text[-lines:])


def _scores(row: Mapping, weights: Path) -> dict:
    keep = (*ALL_SUMMARY_KEYS, *PER_CLASS_KEYS, "reference_thresholds", "reference_on", "classes", "num_samples",
            "num_slices", "num_volumes")
    return {**{k: json_safe(row.get(k)) for k in keep}, "weights": str(weights)}


def json_safe(v):
    # JSON has no NaN; an unscorable metric is stored as null
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [json_safe(x) for x in v]
    return v


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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

    ``sites``: site names, each a prepared folder ``data_root/<site>`` (None: every site folder there).
    ``rounds``: federated rounds (default: the job's); the centralised baseline trains
    ``rounds x local epochs`` epochs. ``checkpoint``: the SAM checkpoint, passed to the simulated sites
    as ``FEDFMS_SAM_CHECKPOINT`` (what the jobs' checkpoint setting refers to) and used for scoring.
    An existing fold folder is never replaced unless ``overwrite``. ``flavour`` (``fedfms.flavours``, for a
    variant): its config fields join the overrides. ``scoring`` (honest, reference, both): which rule the
    printed table and the CSV show; every score of both rules is kept in the JSON whatever it is. ``verbose``: the
    log gets everything the simulator prints (FLARE's INFO log), not only its one line per round.

    Each row: ``method``, ``label``, ``sites`` (held-out site -> scores), the averages over those sites of
    dice/iou/volume_dice/volume_iou and of the paper code's dice_reference/iou_reference, ``num_folds``."""
    check_scoring(scoring)
    say = log or (lambda _msg: None)
    data_root, workspace = Path(data_root).resolve(), Path(workspace).resolve()
    sites = check_sites(data_root, sites if sites else discover_sites(data_root))
    holdouts = list(holdouts) if holdouts else list(sites)
    unknown = [h for h in holdouts if h not in sites]
    if unknown:
        raise ConfigError(f"held-out site(s) {unknown} not among the sites {sites}")
    if len(set(holdouts)) != len(holdouts):
        raise ConfigError(f"held-out sites {holdouts}: a site is listed twice")

    token = _VERBOSE.set(verbose)
    try:
        with _env(FEDFMS_SAM_CHECKPOINT=checkpoint):
            return _run(variant_or_job, data_root, sites, workspace, rounds, holdouts, centralized, train_overrides,
                        model_overrides, overwrite, batch_size, device, say, flavour, scoring)
    finally:
        _VERBOSE.reset(token)


def _run(variant_or_job, data_root: Path, sites: list[str], workspace: Path, rounds, holdouts: list[str], centralized,
         train_overrides, model_overrides, overwrite, batch_size, device, say, flavour=None, scoring="honest") -> list[dict]:
    source = job_source(variant_or_job, train_overrides, model_overrides, flavour)
    base = source.settings()
    rounds = rounds if rounds is not None else base["num_rounds"]
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds is {rounds!r}; expected a positive number of federated rounds")
    model_cfg = ModelConfig.from_dict(dict(base["model"]), "job model config")  # fail on typos before any run
    train_config(base, "job train config")
    if model_cfg.pretrained:
        checkpoint = resolve_model_config(model_cfg).checkpoint
        if not Path(checkpoint).is_file():
            raise CheckpointError(f"{checkpoint}: SAM checkpoint not found (the job's model is pretrained); pass --checkpoint")
    site_classes = read_manifest(data_root / sites[0]).classes
    if model_cfg.num_classes != len(site_classes):
        raise ConfigError(f"the sites have {len(site_classes)} class(es) {site_classes}; the job's model has "
                          f"num_classes={model_cfg.num_classes} (set it with --model '{{\"num_classes\": {len(site_classes)}}}')")

    folds = {h: workspace / h for h in holdouts}
    existing = [p for p in folds.values() if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]}: fold folder already exists; pass --overwrite to replace it or use another --workspace")
    foreign = [p for p in existing if not (p / FOLD_FILE).is_file()]
    if foreign:
        raise ConfigError(f"{foreign[0]}: exists and is not a LOSO fold folder (no {FOLD_FILE}); not replacing it")

    signature = _plain({"job": source.label, "sites": sites, "rounds": rounds,
                        "train_overrides": source.train_overrides, "model_overrides": source.model_overrides})
    workspace.mkdir(parents=True, exist_ok=True)
    for i, holdout in enumerate(holdouts, 1):
        run_fold(source, data_root, sites, holdout, folds[holdout], rounds, centralized, signature,
                 f"{i}/{len(holdouts)}", batch_size, device, say)
    rows, report = collect(workspace, signature)
    report["data_root"] = str(data_root)
    _write_json(workspace / RESULTS_JSON, report)
    write_csv(rows, workspace / RESULTS_CSV, scoring)
    say("")
    say(format_loso_table(rows, report["held_out"], scoring))
    for note in report["notes"]:
        say(note)
    say(f"results: {workspace / RESULTS_JSON}, {workspace / RESULTS_CSV}")
    return rows


def run_fold(source: JobSource, data_root: Path, sites: list[str], holdout: str, fold: Path, rounds: int,
             centralized: bool, signature: dict, counter: str, batch_size: int, device: str, say) -> dict:
    """One fold: federate the other sites, score the global models (and the centralised baseline) on ``holdout``."""
    if fold.exists():
        shutil.rmtree(fold)
    fold.mkdir(parents=True)
    train_sites = [s for s in sites if s != holdout]
    record = {"signature": signature, "holdout": holdout, "train_sites": train_sites, "rounds": rounds,
              "status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": {}}
    _write_json(fold / FOLD_FILE, record)
    start = time.perf_counter()
    say(f"fold {counter}: hold out {holdout}; train on {', '.join(train_sites)}; {rounds} round(s)")
    try:
        _fold_body(source, data_root, holdout, train_sites, fold, rounds, centralized, record, batch_size, device, say)
    except BaseException as exc:
        # the fold stays on disk, marked, so the results leave it out and a rerun needs --overwrite
        record.update(status="failed", error=record.get("error") or f"{type(exc).__name__}: {exc}"[:300],
                      seconds=time.perf_counter() - start)
        _write_json(fold / FOLD_FILE, record)
        raise
    record.update(status="done", seconds=time.perf_counter() - start)
    _write_json(fold / FOLD_FILE, record)
    say(f"fold {counter} ({holdout}) done in {record['seconds']:.0f} s")
    return record


def _fold_body(source: JobSource, data_root: Path, holdout: str, train_sites: list[str], fold: Path, rounds: int,
               centralized: bool, record: dict, batch_size: int, device: str, say) -> None:
    start = time.perf_counter()
    job = source.write(fold / "job", rounds, train_sites)
    settings = job_settings(job)
    # what the fold trained with, so tables can name the method and its flavour without FLARE
    record.update(model_config=settings["model"], train_config=settings["train"],
                  flavour=flavour_of(settings["model"], settings["train"]))
    test_dir = data_root / holdout
    log_path = fold / "simulator.log"
    token = _PROGRESS_SAY.set(say)
    try:
        rc = simulate(job, fold / "simulator", train_sites, data_root, log_path)
    finally:
        _PROGRESS_SAY.reset(token)
    app = server_job_dir(fold / "simulator") / "app_server"
    problem = f"exit code {rc}" if rc != 0 else None
    run_record = read_run_record(server_job_dir(fold / "simulator"))
    if problem and run_record is not None:  # the federation's own account: which site missed which round, why
        problem += f": {' / '.join(line.strip() for line in summarize(run_record).splitlines())}"
    if problem is None and not (app / GLOBAL_MODEL).is_file():
        problem = f"no {GLOBAL_MODEL} was written"
    if problem:
        record["error"] = f"simulation failed ({problem})"
        tail = _tail(log_path)
        raise EvaluationError(f"fold {holdout}: the simulation failed ({problem}); see {log_path}"
                              + (f" (last lines: {tail})" if tail else "") + "; rerun this fold with --overwrite")
    federated_seconds = time.perf_counter() - start
    for method, name in (("federated", GLOBAL_MODEL), ("federated_best", BEST_GLOBAL_MODEL)):
        # FLARE writes a best model only once a validated round improves (never in round 0, so not with 1 round)
        if (app / name).is_file():
            row = evaluate_sites(settings["model"], app / name, [test_dir], batch_size=batch_size, device=device)[0]
            record["results"][method] = _scores(row, app / name)
    fed = record["results"]["federated"]
    say(f"  federated: {federated_seconds:.0f} s; {holdout} Dice {fmt_score(fed['dice'])}, IoU {fmt_score(fed['iou'])}"
        + (f" (best global model: Dice {fmt_score(record['results']['federated_best']['dice'])})"
           if "federated_best" in record["results"] else ""))
    from fedfms.report import best_model_note

    for line in best_model_note(server_job_dir(fold / "simulator")):  # which model "best" is, and whether training helped
        say(f"  {line}")
    record["federated_seconds"] = federated_seconds

    if centralized:
        c_start = time.perf_counter()
        # exactly the job's train config, CPU thread count included: on a shared CPU, more torch threads than
        # free cores made the tiny model's epochs 20-30x slower here, while one thread stayed steady
        train = dict(settings["train"])
        epochs = rounds * train_config(settings).epochs
        weights = train_centralized(settings["model"], train, [data_root / s for s in train_sites], epochs,
                                    fold / "centralized" / "model.pt", log=say)
        history = json.loads(history_path(weights).read_text())
        for method, path in (("centralized", weights), ("centralized_last", last_weights_path(weights))):
            row = evaluate_sites(settings["model"], path, [test_dir], batch_size=batch_size, device=device)[0]
            record["results"][method] = _scores(row, path)
        record["centralized"] = {"epochs": epochs, "selected_epoch": history["selected_epoch"], "selection": history["selection"],
                                 "train_samples": history["train_samples"], "val_samples": history["val_samples"],
                                 "seconds": time.perf_counter() - c_start}
        c = record["results"]["centralized"]
        say(f"  centralized: {record['centralized']['seconds']:.0f} s, {epochs} epoch(s), kept epoch {history['selected_epoch']}; "
            f"{holdout} Dice {fmt_score(c['dice'])}, IoU {fmt_score(c['iou'])}")


# ----------------------------------------------------------------------------------------------------
# results


def _plain(obj):
    return json.loads(json.dumps(obj))


def collect(workspace: str | Path, signature: Mapping) -> tuple[list[dict], dict]:
    """Rows of every finished fold under ``workspace`` run with ``signature``, and the full report."""
    workspace = Path(workspace)
    signature = _plain(signature)
    sites = signature["sites"]
    folds, notes = {}, []
    for path in sorted(workspace.glob(f"*/{FOLD_FILE}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            notes.append(f"note: {path} is unreadable; fold left out")
            continue
        if record.get("status") != "done":
            notes.append(f"note: fold {path.parent.name} did not finish ({record.get('error', record.get('status'))}); left out")
        elif record.get("signature") != signature:
            notes.append(f"note: fold {path.parent.name} was run with other settings; left out")
        else:
            folds[record["holdout"]] = record
    held_out = [s for s in sites if s in folds]
    rows = []
    for method, label in METHODS.items():
        per_site = {s: folds[s]["results"][method] for s in held_out if method in folds[s]["results"]}
        if not per_site:
            continue
        row = {"method": method, "label": label, "sites": per_site, "num_folds": len(per_site)}
        for key in ALL_SUMMARY_KEYS:
            row[key] = finite_mean([r.get(key) for r in per_site.values()])
        for key in ("dice_per_class", "iou_per_class", "dice_reference_per_class", "iou_reference_per_class"):
            lists = [r.get(key) or [] for r in per_site.values()]
            row[key] = [finite_mean(values) for values in zip(*lists)] if lists and all(lists) else None
        row["classes"] = next(iter(per_site.values())).get("classes")
        rows.append(row)
        if len(per_site) < len(held_out):
            notes.append(f"note: '{label}' has {len(per_site)} of {len(held_out)} folds; its average covers those only")
    missing = [s for s in sites if s not in folds]
    if missing:
        notes.append(f"note: {len(held_out)} of {len(sites)} sites held out so far; not yet: {', '.join(missing)}")
    report = {
        "protocol": "leave-one-site-out: each held-out site scored on all its samples; the other sites train "
                    "(each split 9:1 by patient into train/val)",
        **signature,
        "held_out": held_out,
        "missing_folds": missing,
        "average": "unweighted mean over held-out sites of each site's score",
        "metrics": "sigmoid > 0.5; slice Dice/IoU averaged over slices, leaving out slices with empty ground truth and "
                   "empty prediction; volume_* from voxel counts summed per volume; multi-class: mean over classes",
        "metrics_reference": f"dice_reference, iou_reference: {_reference_rule_of(folds)}; multi-class: mean over classes",
        "rows": rows,
        "notes": notes,
        "folds": [folds[s] for s in held_out],
    }
    return rows, report


def _reference_rule_of(folds: Mapping) -> str:
    variants = {(f.get("model_config") or {}).get("variant") for f in folds.values()} - {None}
    return reference_rule(reference_space(variants.pop()) if len(variants) == 1 else "logits")


def write_csv(rows: Sequence[Mapping], path: str | Path, scoring: str = "honest") -> Path:
    """Long format: one line per method and held-out site, then the method's average. With several
    classes (fundus: disc, cup) each class's Dice and IoU get their own columns. ``scoring``: honest
    (dice, iou, volume_dice, volume_iou), reference (dice_reference, iou_reference) or both."""
    path = Path(path)
    keys = scoring_keys(scoring)
    classes = list((rows[0].get("classes") or []) if rows else [])
    per_class = classes if len(classes) > 1 else []
    class_keys = [(m, f"{m}_per_class") for m in ("dice", "iou") if m in keys]
    class_keys += [(m, f"{m}_per_class") for m in ("dice_reference", "iou_reference") if m in keys]
    fields = ["method", "held_out_site", *keys, *[f"{m}_{c}" for c in per_class for m, _ in class_keys], "num_samples"]

    def line(method, site, scores, n):
        extra = []
        for i, _ in enumerate(per_class):
            for _, key in class_keys:
                values = scores.get(key) or []
                extra.append(_csv(values[i] if i < len(values) else None))
        return [method, site, *[_csv(scores.get(k)) for k in keys], *extra, n]

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        for row in rows:
            for site, scores in row["sites"].items():
                writer.writerow(line(row["method"], site, scores, scores.get("num_samples")))
            writer.writerow(line(row["method"], "average", row, sum(int(s.get("num_samples") or 0) for s in row["sites"].values())))
    return path


def _csv(v) -> str:
    return "" if v is None else f"{v:.6f}"


def format_loso_table(rows: Sequence[Mapping], held_out: Sequence[str] | None = None, scoring: str = "honest") -> str:
    """Paper's Table 1 layout: a row per method; Dice and IoU for each held-out site and their average.
    ``scoring``: this project's rule (honest), the paper code's (reference, columns "ref Dice"/"ref IoU",
    with the rule written under the table) or one table of each (both)."""
    check_scoring(scoring)
    if not rows:
        return "(no finished folds)"
    if scoring == "both":
        return "\n\n".join(format_loso_table(rows, held_out, s) for s in ("honest", "reference"))
    dice_key, iou_key = ("dice", "iou") if scoring == "honest" else ("dice_reference", "iou_reference")
    table = _loso_table(rows, held_out, dice_key, iou_key)
    if scoring == "reference":
        variants = {(r.get("reference_on") or "logits") for row in rows for r in row["sites"].values()}
        table = ("the paper code's rule (ref Dice, ref IoU)\n" + table + "\n"
                 + scoring_notes("reference", variants.pop() if len(variants) == 1 else "logits")[0])
    return table


def _loso_table(rows: Sequence[Mapping], held_out, dice_key: str, iou_key: str) -> str:
    sites = list(held_out) if held_out else list(dict.fromkeys(s for r in rows for s in r["sites"]))
    groups = sites + ["average"]
    width = max([13] + [len(g) for g in groups])
    label_w = max(len("method"), *(len(r["label"]) for r in rows))
    top = " " * label_w + "".join("  " + g.center(width) for g in groups)
    sub = "method".ljust(label_w) + "".join("  " + f"{'Dice':>{width // 2}}{'IoU':>{width - width // 2}}" for _ in groups)
    lines = [top, sub, "-" * len(sub)]
    for r in rows:
        cells = []
        for g in groups:
            src = r if g == "average" else r["sites"].get(g, {})
            d, i = src.get(dice_key), src.get(iou_key)
            cells.append("  " + f"{fmt_score(d):>{width // 2}}{fmt_score(i):>{width - width // 2}}")
        lines.append(r["label"].ljust(label_w) + "".join(cells))
    return "\n".join(line.rstrip() for line in lines)
