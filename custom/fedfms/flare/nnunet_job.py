"""The FednnU-Net jobs, rendered from the project's own job renderer (``fedfms.flare.jobs``).

A ``fednnunet`` job is a ``fedunet`` job (same federation settings, ``ScatterAndGather``, FLARE's sample-weighted
``InTimeAccumulateWeightedAggregator``, ``PTFileModelPersistor``, ``IntimeModelSelector``, ``FederationMonitor``,
``CrossSiteModelEval``, TensorBoard, the site's travel-set filter and the server's contribution check) with:

- the ``nnunet_planning`` workflow first (``fedfms.flare.nnunet_planning.NnUNetPlanning``);
- the persistor's model: ``NnUNetGlobalModel`` (the planned network, built once the plan exists);
- the contribution check: ``NnUNetContributionCheckFilter`` (the project's filter; its travel spec comes from
  the plan);
- the executor: ``fedfms.flare.nnunet_executor.NnUNetExecutor``, which also answers the two planning tasks;
- the train config: ``fedfms.nnunet.config.NnUNetConfig`` fields (nnU-Net's settings), the model config a plain
  ``{"variant": "nnunet", "mode": "fedsam", "num_classes": C, "pretrained": false}``;
- timeouts from nnU-Net's workload (iterations per round), not from samples x seconds per sample.

``fedfms.flare.jobs`` holds the variants (``fednnunet``, ``fednnunet_tiny`` in ``VARIANTS``), checks their settings
and calls :func:`server_config` / :func:`client_config` for them, so ``fedfms job new fednnunet``, ``jobs/fednnunet``
and ``fedfms loso fednnunet`` work like the other variants; :func:`render_fednnunet_job` is ``jobs.render_job`` for
these two names.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedfms.errors import ConfigError
from fedfms.flare import jobs
from fedfms.nnunet.config import JOB_VARIANTS, MODEL_CONFIG, NnUNetConfig

PLANNING = "fedfms.flare.nnunet_planning.NnUNetPlanning"
GLOBAL_MODEL = "fedfms.flare.nnunet_planning.NnUNetGlobalModel"
CHECK_FILTER = "fedfms.flare.nnunet_planning.NnUNetContributionCheckFilter"
EXECUTOR = "fedfms.flare.nnunet_executor.NnUNetExecutor"
PLANNING_TASKS = ["nnunet_fingerprint", "nnunet_plan"]

FEDNNUNET_VARIANTS = JOB_VARIANTS  # the entries of jobs.VARIANTS that are FednnU-Net's

# Seconds per nnU-Net training iteration and per predicted case at a slow site (about 10x a current GPU for the
# paper's 2D plan; CPU figures for a CPU job), for the timeouts.
SECONDS_PER_ITERATION = {"gpu": 1.0, "cpu": 0.5}
SECONDS_PER_CASE = {"gpu": 0.1, "cpu": 0.05}
DEFAULT_CASES_PER_SITE = 2000


def is_nnunet(settings: dict) -> bool:
    return (settings.get("model") or {}).get("variant") == MODEL_CONFIG["variant"]


def fednnunet_settings(name: str = "fednnunet", **overrides) -> dict:
    """A FednnU-Net variant's settings with overrides: ``jobs.variant_settings`` (the federation's defaults and
    checks; ``model``/``train`` merged with the overrides and checked as nnU-Net settings; no flavour)."""
    if name not in FEDNNUNET_VARIANTS:
        raise ConfigError(f"job variant is {name!r}; expected one of {sorted(FEDNNUNET_VARIANTS)}")
    return jobs.variant_settings(name, **overrides)


def timeouts(s: dict) -> dict[str, int]:
    """``train``: a round (validation of the global model + the local nnU-Net epochs, x 3 margin); ``plan``: each
    planning broadcast (reading the site included); ``validate``: cross-site evaluation."""
    cfg = NnUNetConfig.from_dict(s["train"])
    kind = "cpu" if cfg.device == "cpu" else "gpu"
    pinned = s.get("site_samples") or {}
    cases = max(pinned.values()) if pinned else (s.get("samples_per_site") or DEFAULT_CASES_PER_SITE)
    predict = cases * SECONDS_PER_CASE[kind] * (4 if cfg.mirror_tta else 1)
    train = s.get("round_timeout") or math.ceil(
        jobs.STARTUP_SECONDS + 3 * (cfg.epochs * cfg.iterations_per_epoch * SECONDS_PER_ITERATION[kind] + predict * cfg.val_fraction))
    return {"train": int(train), "plan": int(math.ceil(jobs.STARTUP_SECONDS + 3 * cases * SECONDS_PER_CASE[kind])),
            "submit": jobs.STARTUP_SECONDS, "validate": int(math.ceil(jobs.STARTUP_SECONDS + 3 * predict))}


def _swap_path(node, old: str, new: str) -> int:
    """Replace a component class path everywhere in a rendered config; the number of replacements."""
    count = 0
    if isinstance(node, dict):
        if node.get("path") == old:
            node["path"] = new
            count += 1
        for value in node.values():
            count += _swap_path(value, old, new)
    elif isinstance(node, list):
        for value in node:
            count += _swap_path(value, old, new)
    return count


def _complete(s: dict) -> dict:
    """The settings with nnU-Net's poly schedule over the whole federation: ``total_epochs`` = the job's rounds x
    the nnU-Net epochs per round, unless the train config sets it (a resumed job keeps the same total)."""
    s = dict(s)
    train = dict(s["train"])
    train.setdefault("total_epochs", int(s["num_rounds"]) * int(train.get("epochs", 1)))
    s["train"] = train
    return s


def server_config(s: dict) -> dict:
    """``jobs.server_config(s)`` made FednnU-Net's (module docstring). ``s``: settings as ``jobs.variant_settings``
    returns them for a ``nnunet`` model."""
    s = _complete(s)
    t = timeouts(s)
    config = jobs.server_config(s)
    persistor = next(c for c in config["components"] if c["id"] == "persistor")
    persistor["args"]["model"] = {"path": GLOBAL_MODEL, "args": dict(s["model"])}
    if not _swap_path(config["task_result_filters"], "fedfms.flare.contribution_filter.ContributionCheckFilter", CHECK_FILTER):
        raise ConfigError("the project's server config has no ContributionCheckFilter to extend")
    workflows = config["workflows"]
    sag = next(w for w in workflows if w["id"] == "scatter_and_gather")
    sag["args"].update(train_timeout=t["train"], wait_time_after_min_received=t["train"])
    cse = next(w for w in workflows if w["id"] == "cross_site_validate")
    cse["args"].update(submit_model_timeout=t["submit"], validation_timeout=t["validate"])
    planning = {"id": "nnunet_planning", "path": PLANNING, "args": {
        "planning_config": dict(s["train"]), "expected_sites": s["sites"], "persistor_id": "persistor", "timeout": t["plan"]}}
    config["workflows"] = [planning, *workflows]
    return config


def client_config(s: dict) -> dict:
    """``jobs.client_config(s)`` with the nnU-Net executor (and its planning tasks)."""
    s = _complete(s)
    config = jobs.client_config(s)
    executor = config["executors"][0]
    executor["tasks"] = [*executor["tasks"], *PLANNING_TASKS]
    executor["executor"]["path"] = EXECUTOR
    for chain in config["task_result_filters"]:
        for f in chain["filters"]:
            if f["path"] == "fedfms.flare.filters.TravelSetFilter":
                # every tensor of the planned network travels; the exact key set is the server's check (the plan
                # only exists once the job runs)
                f["args"] = {"mode": "fedsam"}
    return config


def render_fednnunet_job(name: str = "fednnunet", **overrides) -> dict[str, dict]:
    """Every file of a FednnU-Net job (``name``: ``fednnunet`` or ``fednnunet_tiny``), with the same overrides
    as ``jobs.render_job`` (``num_rounds``, ``sites``, ``train``, ``model``, ``site_samples``, ...)."""
    if name not in FEDNNUNET_VARIANTS:
        raise ConfigError(f"job variant is {name!r}; expected one of {sorted(FEDNNUNET_VARIANTS)}")
    return jobs.render_job(name, **overrides)


def write_fednnunet_job(out_dir: str | Path, name: str = "fednnunet", overwrite: bool = False, **overrides) -> Path:
    if name not in FEDNNUNET_VARIANTS:
        raise ConfigError(f"job variant is {name!r}; expected one of {sorted(FEDNNUNET_VARIANTS)}")
    return jobs.write_job(name, out_dir, overwrite=overwrite, **overrides)
