"""The paper's evaluation protocol: leave one site out (LOSO), FLARE-free.

For each site k: the other sites federate (each split 9:1 into train/val by patient, as always), and the
resulting global model is scored on *every* sample of site k, which took no part in training or model
selection. Optionally the same model is trained centrally on the pooled data of the same training sites
for the same number of epochs (rounds x local epochs, i.e. the same number of passes over the data) and
scored on site k too. One row per method, one column per held-out site and the unweighted average: the
shape of the paper's Table 1.

This module runs the protocol (checks, fold records, scoring, the centralised baseline, the results files);
the federated training of a fold is handed to a :class:`Federation`. The one that runs FLARE's simulator is
``fedfms.flare.loso_runner`` (``fedfms loso``; ``leave_one_site_out`` there), so nothing here imports FLARE.

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

import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

from fedfms.data.site_dataset import read_manifest
from fedfms.errors import CheckpointError, ConfigError, DataError
from fedfms.evaluation.centralized import train_centralized
from fedfms.training.weights_files import history_path, last_weights_path
from fedfms.evaluation.personal import comparison_rows, format_comparison, held_out_model, personal_gaps, read_personal_record, record_dice
from fedfms.evaluation.results import (FOLD_FILE, METHODS, RESULTS_CSV, RESULTS_JSON, EvaluationError, collect, fold_scores,
                                       format_loso_table, plain, write_csv, write_json)
from fedfms.evaluation.scoring import check_scoring, evaluate_sites, is_nnunet_model, resolve_model_config
from fedfms.flavours import flavour_of
from fedfms.models import ModelConfig
from fedfms.nnunet.config import NnUNetConfig
from fedfms.numbers import fmt_score
from fedfms.progress import bar, lines_above
from fedfms.run_record import best_model_note
from fedfms.training.trainer import TrainConfig

__all__ = ["BEST_GLOBAL_MODEL", "FOLD_FILE", "Federation", "GLOBAL_MODEL", "METHODS", "RESULTS_CSV", "RESULTS_JSON",
           "EvaluationError", "check_settings", "check_sites", "discover_sites", "run_fold", "run_loso", "train_config"]

GLOBAL_MODEL = "FL_global_model.pt"
BEST_GLOBAL_MODEL = "best_FL_global_model.pt"

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Say = Callable[[str], None]


class Federation(Protocol):
    """The federated half of a fold. ``label``, ``train_overrides`` and ``model_overrides`` go into the fold's
    signature (folds gather into one table only when these, the sites and the rounds match)."""

    label: str
    train_overrides: dict
    model_overrides: dict

    def settings(self) -> dict:
        """``{"model", "train", "num_rounds"}``: what the sites will train with, checked before any fold runs."""

    def write(self, fold: Path, train_sites: list[str], rounds: int) -> dict:
        """Prepare the fold's federation (its job: these sites, all expected, ``rounds`` rounds); return the
        ``{"model", "train"}`` its sites train with (and ``"personalise"``: the job's setting, if any)."""

    def run(self, fold: Path, train_sites: list[str], data_root: Path, say: Say) -> Path:
        """Federate; return the folder holding the global models (``GLOBAL_MODEL``, maybe ``BEST_GLOBAL_MODEL``),
        inside the server's run folder (its run record: ``fedfms.run_record.best_model_note``), or raise
        :class:`EvaluationError` (with ``summary``) when no global model came out."""


def train_config(settings: Mapping, where: str = "train config") -> TrainConfig | NnUNetConfig:
    """The checked train config of ``{"model", "train"}`` settings: nnU-Net's fields for the nnU-Net baseline."""
    cls = NnUNetConfig if is_nnunet_model(settings.get("model") or {}) else TrainConfig
    return cls.from_dict(dict(settings["train"]), where)


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


def check_settings(settings: Mapping, site_classes: Sequence[str]) -> None:
    """Fail on typos, a missing SAM checkpoint or a class count the sites do not have, before any fold runs."""
    model_cfg = ModelConfig.from_dict(dict(settings["model"]), "job model config")
    train_config(settings, "job train config")
    if model_cfg.pretrained:
        checkpoint = resolve_model_config(model_cfg).checkpoint
        if not Path(checkpoint).is_file():
            raise CheckpointError(f"{checkpoint}: SAM checkpoint not found (the job's model is pretrained); pass --checkpoint")
    held_out_model(model_cfg.to_dict())  # a job whose held-out site could not run the global model is refused here
    if model_cfg.num_classes != len(site_classes):
        raise ConfigError(f"the sites have {len(site_classes)} class(es) {list(site_classes)}; the job's model has "
                          f"num_classes={model_cfg.num_classes} (set it with --model '{{\"num_classes\": {len(site_classes)}}}')")


# ----------------------------------------------------------------------------------------------------
# the protocol


def run_loso(federation: Federation, data_root: str | Path, sites: Sequence[str] | None, workspace: str | Path,
             rounds: int | None = None, holdouts: Sequence[str] | None = None, centralized: bool = False,
             overwrite: bool = False, batch_size: int = 6, device: str = "auto", log: Say | None = print,
             scoring: str = "honest") -> list[dict]:
    """Run the LOSO folds for ``holdouts`` (default: every site) with ``federation`` and return the table rows
    (arguments as ``fedfms.flare.loso_runner.leave_one_site_out``, which calls this with FLARE's simulator)."""
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

    base = federation.settings()
    rounds = rounds if rounds is not None else base.get("num_rounds")
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds is {rounds!r}; expected a positive number of federated rounds")
    check_settings(base, read_manifest(data_root / sites[0]).classes)

    folds = {h: workspace / h for h in holdouts}
    existing = [p for p in folds.values() if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]}: fold folder already exists; pass --overwrite to replace it or use another --workspace")
    foreign = [p for p in existing if not (p / FOLD_FILE).is_file()]
    if foreign:
        raise ConfigError(f"{foreign[0]}: exists and is not a LOSO fold folder (no {FOLD_FILE}); not replacing it")

    signature = plain({"job": federation.label, "sites": sites, "rounds": rounds,
                       "train_overrides": federation.train_overrides, "model_overrides": federation.model_overrides})
    workspace.mkdir(parents=True, exist_ok=True)
    with bar(total=len(holdouts), desc="LOSO", unit="fold", leave=True, enabled=None if log else False) as folds_bar:
        fold_say = lines_above(folds_bar, say)
        for i, holdout in enumerate(holdouts, 1):
            folds_bar.set_postfix_str(f"holding out {holdout}")
            run_fold(federation, data_root, sites, holdout, folds[holdout], rounds, centralized, signature,
                     f"{i}/{len(holdouts)}", batch_size, device, fold_say)
            folds_bar.update()
    rows, report = collect(workspace, signature)
    report["data_root"] = str(data_root)
    write_json(workspace / RESULTS_JSON, report)
    write_csv(rows, workspace / RESULTS_CSV, scoring)
    say("")
    say(format_loso_table(rows, report["held_out"], scoring))
    if report.get("personal"):
        say("")
        say(f"personalised ({report['personalise']}); held-out site: {report['held_out_model']}")
        say("each site as a training site, on its own validation slices (mean over the folds it trained in):")
        say(format_comparison(comparison_rows(report["personal"])))
    for note in report["notes"]:
        say(note)
    say(f"results: {workspace / RESULTS_JSON}, {workspace / RESULTS_CSV}")
    return rows


def run_fold(federation: Federation, data_root: Path, sites: list[str], holdout: str, fold: Path, rounds: int,
             centralized: bool, signature: dict, counter: str, batch_size: int, device: str, say: Say) -> dict:
    """One fold: federate the other sites, score the global models (and the centralised baseline) on ``holdout``."""
    if fold.exists():
        shutil.rmtree(fold)
    fold.mkdir(parents=True)
    train_sites = [s for s in sites if s != holdout]
    record = {"signature": signature, "holdout": holdout, "train_sites": train_sites, "rounds": rounds,
              "status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": {}}
    write_json(fold / FOLD_FILE, record)
    start = time.perf_counter()
    say(f"fold {counter}: hold out {holdout}; train on {', '.join(train_sites)}; {rounds} round(s)")
    try:
        _fold_body(federation, data_root, holdout, train_sites, fold, rounds, centralized, record, batch_size, device, say)
    except BaseException as exc:
        # the fold stays on disk, marked, so the results leave it out and a rerun needs --overwrite
        summary = getattr(exc, "summary", None) or f"{type(exc).__name__}: {exc}"
        record.update(status="failed", error=summary[:300], seconds=time.perf_counter() - start)
        write_json(fold / FOLD_FILE, record)
        raise
    record.update(status="done", seconds=time.perf_counter() - start)
    write_json(fold / FOLD_FILE, record)
    say(f"fold {counter} ({holdout}) done in {record['seconds']:.0f} s")
    return record


def _fold_body(federation: Federation, data_root: Path, holdout: str, train_sites: list[str], fold: Path, rounds: int,
               centralized: bool, record: dict, batch_size: int, device: str, say: Say) -> None:
    start = time.perf_counter()
    settings = federation.write(fold, train_sites, rounds)
    # what the fold trained with, so tables can name the method and its flavour without FLARE
    record.update(model_config=settings["model"], train_config=settings["train"],
                  flavour=flavour_of(settings["model"], settings["train"]))
    local = bool(settings["model"].get("local_parts"))
    if settings.get("personalise"):
        record.update(personalise=settings["personalise"], held_out_model=held_out_model(settings["model"]))
    models = federation.run(fold, train_sites, data_root, say)
    if not (models / GLOBAL_MODEL).is_file():
        problem = f"no {GLOBAL_MODEL} was written"
        raise EvaluationError(f"fold {holdout}: {problem} in {models}; rerun this fold with --overwrite", summary=problem)
    federated_seconds = time.perf_counter() - start
    test_dir = data_root / holdout
    for method, name in (("federated", GLOBAL_MODEL), ("federated_best", BEST_GLOBAL_MODEL)):
        # FLARE writes a best model only once a validated round improves (never in round 0, so not with 1 round)
        if (models / name).is_file():
            row = evaluate_sites(settings["model"], models / name, [test_dir], batch_size=batch_size, device=device,
                                 initial_local=local)[0]
            record["results"][method] = fold_scores(row, models / name)
    fed = record["results"]["federated"]
    say(f"  federated: {federated_seconds:.0f} s; {holdout} Dice {fmt_score(fed['dice'])}, IoU {fmt_score(fed['iou'])}"
        + (f" (best global model: Dice {fmt_score(record['results']['federated_best']['dice'])})"
           if "federated_best" in record["results"] else ""))
    for line in best_model_note(models.parent):  # which model "best" is, and whether training helped
        say(f"  {line}")
    record["federated_seconds"] = federated_seconds
    if settings.get("personalise"):
        personal = read_personal_record(models.parent) or {}
        record["personal"] = record_dice(personal)
        record["personal_gaps"] = personal_gaps(personal)
        say(f"  held-out {holdout}: {record['held_out_model']}")
        say(f"  the training sites' own validation slices (personalise {settings['personalise']}):")
        for line in format_comparison(comparison_rows(record["personal"])).splitlines():
            say(f"    {line}")
        for gap in record["personal_gaps"]:
            say(f"  warning: {gap}")

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
            record["results"][method] = fold_scores(row, path)
        record["centralized"] = {"epochs": epochs, "selected_epoch": history["selected_epoch"], "selection": history["selection"],
                                 "train_samples": history["train_samples"], "val_samples": history["val_samples"],
                                 "seconds": time.perf_counter() - c_start}
        c = record["results"]["centralized"]
        say(f"  centralized: {record['centralized']['seconds']:.0f} s, {epochs} epoch(s), kept epoch {history['selected_epoch']}; "
            f"{holdout} Dice {fmt_score(c['dice'])}, IoU {fmt_score(c['iou'])}")
