"""The single source of truth for the FLARE jobs in ``jobs/``.

Each variant is a few configuration values; this module holds them, checks a variant's settings with the user's
overrides (:func:`variant_settings`) and derives what the components are given from them (timeouts, monitor
arguments, update kind), and reads a job folder back. It builds nothing: ``fedfms.flare.fed_job`` makes the FLARE
Job API object from these settings (``build_job``, ``write_job``), whose ``export_job`` writes FLARE's classic JSON
job (``meta.json`` + ``app/config/config_fed_{server,client}.json``). ``fedfms job generate`` rewrites ``jobs/``
and a test checks the checked-in JSON still equals what the builder exports.

The checked-in jobs carry no custom code (the production flavour: ``fedfms`` is pre-installed at every
site and allowed by ``class_allow_list``). :func:`export_byoc` adds ``app/custom/fedfms`` for federations
that grant the bring-your-own-code right instead.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from fedfms.aggregation import NORM_BOUND_ACTIONS
from fedfms.errors import ConfigError
from fedfms.flare.monitor import ON_MISSING_SITE, default_min_sites
from fedfms.flare.update_check import DEFAULT_MAX_SAMPLES, expected_travel_spec
from fedfms.flavours import apply_flavour
from fedfms.flare.site_config import DEFAULT_CHECKPOINT, DEFAULT_DATA_DIR
from fedfms.models import ModelConfig
# nnU-Net's settings only (no nnU-Net import): rendering a job never loads nnU-Net (tests/nnunet/test_layering.py)
from fedfms.nnunet.config import JOB_VARIANTS as NNUNET_VARIANTS, NNUNET_VARIANT, NnUNetConfig, check_model_config
from fedfms.models.travel import check_local_parts
from fedfms.run_record import RUN_RECORD, read_run_record
from fedfms.training.distributed import check_processes_per_site
from fedfms.training.personal import Personalisation
from fedfms.training.trainer import TrainConfig

PAPER_TRAIN = {"epochs": 1, "batch_size": 6, "lr": 1e-4, "betas": [0.9, 0.999], "loss": "bce", "val_fraction": 0.1}
# The tiny jobs' local training: a site of a few samples (4 microscopy tiles) makes one step per epoch at batch 6,
# so a round runs 20 local epochs at lr 3e-3 (with 1 epoch at 1e-3, FedMSA-tiny ended its 2 rounds at Dice 0 there).
CPU_TRAIN = {"epochs": 20, "batch_size": 6, "lr": 3e-3, "betas": [0.9, 0.999], "loss": "bce_dice", "val_fraction": 0.2,
             "threads": 1, "device": "cpu"}


def _sam(variant: str, mode: str) -> dict:
    # Batch 6 at 1024 px with bf16 and the fused attention needs 9-14 GB (vit_b) and 24-35 GB (vit_l) on the
    # GPU (bench/results/gpu_bench_h200_fused.txt); sites with smaller GPUs set activation_checkpointing.
    return {"variant": variant, "mode": mode, "num_classes": 1, "pretrained": True, "checkpoint": DEFAULT_CHECKPOINT}


def _tiny(mode: str) -> dict:
    return {"variant": "tiny", "mode": mode, "num_classes": 1, "pretrained": False, "init_seed": 0}


VARIANTS: dict[str, dict] = {
    "fedsam": {"model": _sam("vit_b", "fedsam"), "train": PAPER_TRAIN, "num_rounds": 100},
    "fedmsa": {"model": _sam("vit_b", "fedmsa"), "train": PAPER_TRAIN, "num_rounds": 100},
    "fedsam_l": {"model": _sam("vit_l", "fedsam"), "train": PAPER_TRAIN, "num_rounds": 100},
    "fedmsa_l": {"model": _sam("vit_l", "fedmsa"), "train": PAPER_TRAIN, "num_rounds": 100},
    # The paper's FedU-Net baseline: MONAI's BasicUNet from scratch, same data, training and aggregation.
    "fedunet": {"model": {"variant": "unet", "mode": "fedsam", "num_classes": 1, "pretrained": False},
                "train": PAPER_TRAIN, "num_rounds": 100},
    # Random-init tiny SAM: CI, POC checks and the offline CPU demo.
    # Their rounds last a fraction of a second, so sites ask for the next task sooner than FLARE's default 2 s.
    # Their rounds last about a second, so FLARE's fixed costs matter (bench/results/bench_round_overhead_cpu.txt):
    # sites poll for the next task every 0.1 s instead of FLARE's 2 s (cross-site evaluation takes one task per
    # poll: 10 s at 2 s, 1.5 s at 0.1 s), and the server skips the gc.collect + malloc_trim FLARE runs after every
    # round (0.3-1.0 s per round here; the large variants keep FLARE's default).
    "fedsam_tiny": {"model": _tiny("fedsam"), "train": CPU_TRAIN, "num_rounds": 2, "task_request_interval": 0.1,
                    "memory_gc_rounds": 0},
    "fedmsa_tiny": {"model": _tiny("fedmsa"), "train": CPU_TRAIN, "num_rounds": 2, "task_request_interval": 0.1,
                    "memory_gc_rounds": 0},
    # The paper's FednnU-Net baseline (docs/nnunet.md): nnU-Net v2's 2D network, planned once for the federation
    # from the sites' merged fingerprints, trained with nnU-Net's own pieces; fednnunet_tiny is its CPU variant.
    **NNUNET_VARIANTS,
}


FEDERATION_DEFAULTS = {
    "sites": None,  # names of the sites that must take part (None: whoever is connected when the job starts)
    "min_sites": None,  # fewest accepted contributions a round may average (None: a majority of the sites)
    "on_missing_site": "continue",  # or "stop": any expected site missing from a round stops the job
    "max_samples": DEFAULT_MAX_SAMPLES,  # bound on the sample count (FedAvg weight) a site may report
    "site_samples": None,  # {site: count}: pinned FedAvg weights, from each site's `fedfms check-site`
    "round_timeout": None,  # outer bound in seconds on a round's wait (None: none; liveness ends dead or silent sites)
    "no_progress_timeout": None,  # seconds without a report from a site before a round stops waiting for it (None: 120)
    "samples_per_site": None,  # no longer used (timeouts are not derived from data sizes); kept so older recipes render
    "aggregation": "fedavg",  # "fedavg" (FLARE's own), or robust: "mean", "median", "trimmed_mean"
    "trim_fraction": 0.2,
    "norm_bound": None,  # clip updates farther than K x the round's median distance from the global model
    "norm_bound_action": "clip",
    "start_round": 0,
    "resume": None,  # set by resume_settings(): continue a stopped run
    "flavour": None,  # "reference": head, input scaling, pos_weight, adapter init as the paper's code (fedfms.flavours)
    "tracking": "tensorboard",  # or "mlflow": FLARE's MLflow receiver too (a SQLite store in the server's run folder)
    "update": "weights",  # or "weight_diff": sites send their change to the global model
    "privacy": None,  # "percentile" or "svt": FLARE's differential-privacy result filters (imply weight_diff)
    "privacy_args": None,  # the filter's arguments, e.g. {"percentile": 10, "gamma": 0.01}
    "encryption": None,  # or "he": FedMSA's travel set as CKKS ciphertext (FLARE's TenSEAL filters, docs/privacy-he.md)
    "he_max_abs": None,  # under HE: largest |weight| a site may encrypt (default fedfms.flare.he.DEFAULT_MAX_ABS)
    # e.g. "norm,finetune:5": what each site keeps of the model (norm, head, decoder) and does after the last round
    # (finetune:N, alone); sets the model's local_parts (fedfms.training.personal, docs/federation.md#personalised-federation)
    "personalise": None,
}
ENCRYPTIONS = (None, "he")
PRIVACY_FILTERS = {"percentile": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
                   "svt": "nvflare.app_common.filters.svt_privacy.SVTPrivacy"}
TRACKING = ("tensorboard", "mlflow")
AGGREGATIONS = ("fedavg", "mean", "median", "trimmed_mean")

def round_timeouts(s: dict) -> dict[str, int]:
    """The fixed outer bounds of FLARE's waits (0: none): ``train`` (a round), ``submit``/``validate`` (cross-site
    evaluation). Only ``round_timeout`` sets them; otherwise a wait lasts as long as its sites report progress and
    ends for a site once it is dead or silent for ``no_progress_timeout`` (fedfms.flare.liveness). Nothing is
    derived from an assumed speed: that cut off sites slower than a third of an H100 while they were training."""
    bound = int(math.ceil(s["round_timeout"])) if s.get("round_timeout") else 0
    return {"train": bound, "submit": bound, "validate": bound}


def personalisation(s: dict):
    """The job's parsed ``personalise`` setting (fedfms.training.personal.Personalisation), or None."""
    return Personalisation.parse(s.get("personalise"), f"job {s.get('name')}: personalise")


def alone_epochs(s: dict) -> int:
    """The site-alone comparison's epochs: as many passes over the site's data as the federation made."""
    p = personalisation(s)
    return s["num_rounds"] * int(s["train"].get("epochs", 1)) if p is not None and p.alone else 0


def personalise_timeout(s: dict) -> int:
    """How long the personalisation step waits for its sites: like a round, only the job's ``round_timeout`` bounds
    it (0: none); a site that dies or falls silent is ended by the federation monitor's liveness watch, which tells
    whichever workflow is running (``fedfms.flare.liveness``). Nothing is derived from an assumed speed."""
    return round_timeouts(s)["train"]


PERSONALISE_TASK = "personalise"


def model_tasks_out(s: dict) -> list[str]:
    """Tasks whose data carries a model to the sites (the personalisation step sends the final global model)."""
    return MODEL_TASKS_OUT + ([PERSONALISE_TASK] if s.get("personalise") else [])


def _check_personalise(s: dict, where: str) -> None:
    """``personalise`` parsed and written back canonically; it alone sets the model's ``local_parts``."""
    p = personalisation(s)
    declared = s["model"].get("local_parts")
    if p is None:
        if declared:
            raise ConfigError(f"{where}: model local_parts {declared!r} is set by the job's personalise setting; "
                              f"use --personalise {','.join(declared)} instead")
        s["model"].pop("local_parts", None)
        return
    if declared and check_local_parts(declared, f"{where}: model") != p.local_parts:
        raise ConfigError(f"{where}: model local_parts {declared!r} differ from personalise {str(p)!r}; set them with "
                          "--personalise only")
    if is_nnunet(s):
        raise ConfigError(f"{where}: personalise is for the SAM and U-Net jobs; the nnU-Net baseline has its own trainer")
    if s["encryption"] == "he":
        raise ConfigError(f"{where}: personalise with encryption 'he' is not supported yet (the encrypted travel set "
                          "and the sites' local part are not wired together)")
    if p.local_parts and s["processes_per_site"] != 1:
        raise ConfigError(f"{where}: processes_per_site is {s['processes_per_site']}, but personalise {str(p)!r} keeps "
                          "part of the model at each site: personalised jobs train in one process per site")
    s["personalise"] = str(p)
    if p.local_parts:
        s["model"]["local_parts"] = list(p.local_parts)
    else:
        s["model"].pop("local_parts", None)


def _check_federation(s: dict, where: str) -> None:
    sites = s["sites"]
    if sites is not None:
        if not isinstance(sites, list) or not sites or not all(isinstance(x, str) and x for x in sites):
            raise ConfigError(f"{where}: sites is {sites!r}; expected a non-empty list of site names")
        if len(set(sites)) != len(sites) or "server" in sites:
            raise ConfigError(f"{where}: sites {sites} repeat a name or use 'server' (reserved for the FL server)")
    n = s["min_sites"]
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1 or (sites and n > len(sites))):
        raise ConfigError(f"{where}: min_sites is {n!r}; expected an integer from 1 to the number of sites"
                          + (f" ({len(sites)})" if sites else ""))
    if s["on_missing_site"] not in ON_MISSING_SITE:
        raise ConfigError(f"{where}: on_missing_site is {s['on_missing_site']!r}; expected one of {ON_MISSING_SITE}")
    if not isinstance(s["max_samples"], int) or s["max_samples"] < 1:
        raise ConfigError(f"{where}: max_samples is {s['max_samples']!r}; expected a positive integer")
    pinned = s["site_samples"]
    if pinned and sites and sorted(set(pinned) - set(sites)):
        raise ConfigError(f"{where}: site_samples names {sorted(set(pinned) - set(sites))}, which are not among sites {sites}")
    if pinned is not None and (not isinstance(pinned, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pinned.values())):
        raise ConfigError(f"{where}: site_samples is {pinned!r}; expected {{site: positive integer}} "
                          "(each site's train_samples from `fedfms check-site`)")
    for key in ("round_timeout", "samples_per_site", "no_progress_timeout"):
        v = s[key]
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise ConfigError(f"{where}: {key} is {v!r}; expected a positive number")
    if s["aggregation"] not in AGGREGATIONS:
        raise ConfigError(f"{where}: aggregation is {s['aggregation']!r}; expected one of {AGGREGATIONS}")
    if not 0 <= s["trim_fraction"] < 0.5:
        raise ConfigError(f"{where}: trim_fraction is {s['trim_fraction']!r}; expected 0 <= trim_fraction < 0.5")
    if s["norm_bound"] is not None and not (isinstance(s["norm_bound"], (int, float)) and s["norm_bound"] > 0):
        raise ConfigError(f"{where}: norm_bound is {s['norm_bound']!r}; expected a positive number (e.g. 3)")
    if s["norm_bound_action"] not in NORM_BOUND_ACTIONS:
        raise ConfigError(f"{where}: norm_bound_action is {s['norm_bound_action']!r}; expected one of {NORM_BOUND_ACTIONS}")
    if s["update"] not in ("weights", "weight_diff"):
        raise ConfigError(f"{where}: update is {s['update']!r}; expected 'weights' or 'weight_diff'")
    if s["privacy"] is not None and s["privacy"] not in PRIVACY_FILTERS:
        raise ConfigError(f"{where}: privacy is {s['privacy']!r}; expected one of {sorted(PRIVACY_FILTERS)}")
    if s["privacy_args"] is not None and not isinstance(s["privacy_args"], dict):
        raise ConfigError(f"{where}: privacy_args is {s['privacy_args']!r}; expected a JSON object of the filter's arguments")
    if s["encryption"] not in ENCRYPTIONS:
        raise ConfigError(f"{where}: encryption is {s['encryption']!r}; expected 'he' or none")
    if s["encryption"] == "he":
        if is_nnunet(s) or s["model"].get("mode") != "fedmsa":
            raise ConfigError(f"{where}: encryption 'he' is for FedMSA's travel set (adapters + decoder); this job's model "
                              f"is {s['model'].get('variant')}/{s['model'].get('mode')}, whose whole model as ciphertext "
                              "would be far too large per round (docs/privacy-he.md)")
        check_he_settings(s)
    if s["tracking"] not in TRACKING:
        raise ConfigError(f"{where}: tracking is {s['tracking']!r}; expected one of {TRACKING}")
    if not isinstance(s["start_round"], int) or not 0 <= s["start_round"] < s["num_rounds"]:
        raise ConfigError(f"{where}: start_round is {s['start_round']!r}; expected a round before num_rounds "
                          f"({s['num_rounds']}): nothing is left to run")


def check_he_settings(settings: dict) -> None:
    """HE sums ciphertexts: only FLARE's FedAvg, full float32 weights, no other filter that needs plaintext."""
    where = f"job {settings.get('name', '?')}: he"
    if settings.get("aggregation", "fedavg") != "fedavg" or settings.get("norm_bound") is not None:
        raise ConfigError(f"{where}: the server sums ciphertexts, so robust aggregation ({settings.get('aggregation')}, "
                          f"norm_bound {settings.get('norm_bound')}) cannot run; use aggregation fedavg without norm_bound")
    if settings.get("transfer", "float32") != "float32":
        raise ConfigError(f"{where}: transfer {settings['transfer']!r} does not apply (ciphertexts travel); use float32")
    if settings.get("privacy"):
        raise ConfigError(f"{where}: the differential-privacy filters are not combined with HE here")
    if settings.get("update", "weights") != "weights":
        raise ConfigError(f"{where}: update {settings['update']!r}: HE jobs send whole weights (the server cannot "
                          "add a plaintext difference to an encrypted global model)")


SETTING_KEYS = ("num_rounds", "min_clients", "num_classes", "data_dir", "transfer", "task_request_interval", "memory_gc_rounds", "model",
                "train", "processes_per_site", *FEDERATION_DEFAULTS)


def variant_settings(name: str, **overrides) -> dict:
    """A variant's settings with overrides: any of :data:`SETTING_KEYS` (``train`` and ``model`` are merged).
    ``min_clients`` is the old name of ``min_sites``."""
    if name not in VARIANTS:
        raise ConfigError(f"job variant is {name!r}; expected one of {sorted(VARIANTS)}")
    s = copy.deepcopy(VARIANTS[name])
    s["name"] = name
    s.setdefault("data_dir", DEFAULT_DATA_DIR)
    s.setdefault("transfer", "float32")
    s.setdefault("task_request_interval", 2.0)  # FLARE's default wait of a site between two tasks
    s.setdefault("memory_gc_rounds", 1)  # FLARE's default: the server collects garbage after every round
    s.setdefault("processes_per_site", 1)  # DDP processes per site (one per GPU, docs/multi-gpu.md); a site may set its own
    for key, value in FEDERATION_DEFAULTS.items():
        s.setdefault(key, copy.deepcopy(value))
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "num_classes":
            s["model"]["num_classes"] = int(value)
        elif key in ("model", "train"):
            s[key].update(value)
        elif key == "min_clients":
            s["min_sites"] = value
        elif key == "transfer":
            if value not in TRANSFER_TYPES:
                raise ConfigError(f"transfer is {value!r}; expected one of {TRANSFER_TYPES}")
            s[key] = value
        elif key in SETTING_KEYS:
            s[key] = list(value) if key == "sites" else value
        else:
            raise ConfigError(f"unknown job setting {key!r}; expected one of {', '.join(SETTING_KEYS)}")
    if s.get("privacy"):
        s["update"] = "weight_diff"  # FLARE's privacy filters work on differences to the global model
    _check_personalise(s, f"job {name}")

    n = check_processes_per_site(s["processes_per_site"], f"job {name}: processes_per_site")
    if is_nnunet(s):
        if n != 1:
            raise ConfigError(f"job {name}: processes_per_site is {n}; the nnU-Net baseline trains in one process per site")
        # nnU-Net trains with its own settings: the flavours' SAM head, input scaling and pos_weight do not apply
        if s["flavour"] not in (None, "project"):
            raise ConfigError(f"job {name}: the nnU-Net baseline has no flavour {s['flavour']!r}: it trains with "
                              "nnU-Net's own settings (docs/nnunet.md)")
        s["flavour"] = None
        # a typo must fail here, not at every site when the job starts
        s["model"] = check_model_config(s["model"], f"job {name}: model")
        NnUNetConfig.from_dict(s["train"], f"job {name}: train")
    else:
        if s["flavour"] is not None:
            s["model"], s["train"] = apply_flavour(s["flavour"], s["model"], s["train"], s["model"].get("variant"))
        # a typo must fail here, not at every site when the job starts
        ModelConfig.from_dict(s["model"], f"job {name}: model")
        TrainConfig.from_dict(s["train"], f"job {name}: train")
        if s["model"].get("local_parts"):
            expected_travel_spec(s["model"])  # a local part the model lacks (or one holding all of it) fails here
    _check_federation(s, f"job {name}")
    return s


def is_nnunet(s: dict) -> bool:
    """Whether settings (or a job's ``{"model": ...}``) are the FednnU-Net baseline's (model variant ``nnunet``)."""
    return (s.get("model") or {}).get("variant") == NNUNET_VARIANT


# Models travel as float32, or as float16 through FLARE's own quantisation filters (half the bytes; the
# receiving side restores float32 before anything is checked, averaged or trained).
TRANSFER_TYPES = ("float32", "float16")
MODEL_TASKS_OUT = ["train", "validate"]  # tasks whose data carries a model to the sites
MODEL_TASKS_BACK = ["train", "submit_model"]  # tasks whose results carry a model back


DEAD_CLIENT_GRACE_S = 15  # above the sites' 10 s job heartbeat, so a live site is never given up on
DEAD_CLIENT_LEAD_S = 10


def min_sites(s: dict) -> int | None:
    if s["min_sites"] is not None:
        return s["min_sites"]
    return default_min_sites(len(s["sites"])) if s["sites"] else None


def min_clients(s: dict) -> int:
    """FLARE's ``min_clients``, one value for the job's ``meta.json`` (the scheduler starts the job once that many
    sites are connected) and the server's workflows (the fewest results a round goes on with): ``min_sites``, or 2
    for a job without a site list (a federation of one site is none; the federation monitor's default for two
    sites is both of them)."""
    return min_sites(s) or 2


def monitor_args(s: dict) -> dict:
    """The federation monitor's arguments (plaintext and HE jobs alike)."""
    args = {"expected_sites": sorted(s["sites"]) if s["sites"] else None, "min_sites": min_sites(s),
            "on_missing_site": s["on_missing_site"]}
    if s["no_progress_timeout"] is not None:  # else the monitor's default (fedfms.flare.liveness)
        args["no_progress_timeout"] = s["no_progress_timeout"]
    if s["resume"]:
        args["resume"] = {k: s["resume"][k] for k in ("record", "best_model", "best_metric")}
    return args


def update_kind(s: dict) -> str:
    """FLARE's DataKind of the training results: the weights, or their change to the global model."""
    return "WEIGHT_DIFF" if s["update"] == "weight_diff" else "WEIGHTS"


def complete_nnunet(s: dict) -> dict:
    """A FednnU-Net job's settings with nnU-Net's poly schedule over the whole federation: ``total_epochs`` = the
    job's rounds x the nnU-Net epochs per round, unless the train config sets it (a resumed job keeps the same total)."""
    s = dict(s)
    train = dict(s["train"])
    train.setdefault("total_epochs", int(s["num_rounds"]) * int(train.get("epochs", 1)))
    s["train"] = train
    return s


@dataclass(frozen=True)
class JobSettings:
    """A job's checked settings and every value the builder derives from them, computed once (:func:`job_settings`):
    the job builder (``fedfms.flare.fed_job``, ``he_job``) reads these and derives nothing itself."""

    values: Mapping  # the checked settings (variant_settings; a FednnU-Net job's completed)
    nnunet: bool
    min_sites: int | None  # the federation monitor's
    min_clients: int  # FLARE's, in meta.json and the workflow
    timeouts: Mapping[str, int]  # train, submit, validate, plan (round_timeouts)
    monitor_args: Mapping
    update_kind: str
    model_tasks_out: list[str]
    alone_epochs: int
    personalise_timeout: int


def job_settings(name: str, **overrides) -> JobSettings:
    """The settings of variant ``name`` with ``overrides`` (any of :data:`SETTING_KEYS`), checked, with what the
    components are given derived once."""
    s = variant_settings(name, **overrides)
    nnunet = is_nnunet(s)
    if nnunet:
        s = complete_nnunet(s)
    timeouts = round_timeouts(s)
    return JobSettings(values=s, nnunet=nnunet, min_sites=min_sites(s), min_clients=min_clients(s),
                       timeouts={**timeouts, "plan": timeouts["train"]}, monitor_args=monitor_args(s),
                       update_kind=update_kind(s), model_tasks_out=model_tasks_out(s), alone_epochs=alone_epochs(s),
                       personalise_timeout=personalise_timeout(s))


RECIPE_KEY = "fedfms_recipe"  # meta.json: the variant and settings the job was rendered from


def job_recipe(job_dir: str | Path) -> tuple[str, dict] | None:
    """(variant, settings) a job folder was rendered from; None for a job written by hand."""
    meta_path = Path(job_dir) / "meta.json"
    try:
        recipe = json.loads(meta_path.read_text()).get(RECIPE_KEY)
    except FileNotFoundError:
        raise ConfigError(f"{job_dir}: not a FLARE job folder (no meta.json)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{meta_path}: not valid JSON ({exc})") from None
    if not recipe:
        return None
    if not isinstance(recipe, dict) or recipe.get("variant") not in VARIANTS or not isinstance(recipe.get("settings"), dict):
        raise ConfigError(f"{meta_path}: field {RECIPE_KEY!r} is {recipe!r}; expected {{'variant': one of "
                          f"{sorted(VARIANTS)}, 'settings': {{...}}}}")
    return recipe["variant"], dict(recipe["settings"])


def resume_settings(run: str | Path) -> dict:
    """Settings that continue a stopped run from its last saved global model: ``start_round`` after the last
    round whose model was saved, the saved global model as the persistor's source, the sites' accepted sample
    counts pinned, and the previous best model and metric for the model selection. ``run``: the server's run
    folder of the stopped job (or anything above it holding one ``fedfms_run.json``)."""
    run = Path(run)
    found = [run] if run.is_file() else sorted(run.rglob(RUN_RECORD), key=lambda p: (len(p.parts), str(p))) if run.is_dir() else []
    if not found:
        raise ConfigError(f"{run}: no {RUN_RECORD} found; expected the server's run folder of the job to continue")
    record_path = found[0].resolve()
    record = read_run_record(record_path)
    if record is None:
        raise ConfigError(f"{record_path}: not a readable run record")
    persisted = record.get("persisted_round")
    if persisted is None:
        raise ConfigError(f"{record_path}: no round of that run saved a global model (persisted_round is null); "
                          "start it again instead")
    models = [p for p in record_path.parent.rglob("FL_global_model.pt") if not p.name.startswith("best")]
    if not models:
        raise ConfigError(f"{record_path.parent}: no FL_global_model.pt beside the run record")
    best = next(iter(record_path.parent.rglob("best_FL_global_model.pt")), None)
    pinned = {site: info["samples"] for site, info in (record.get("sites") or {}).items() if info.get("samples")}
    return {
        "start_round": int(persisted) + 1,
        "site_samples": pinned or None,
        "resume": {"record": str(record_path), "global_model": str(models[0].resolve()),
                   "best_model": str(best.resolve()) if best else None,
                   "best_metric": (record.get("best") or {}).get("metric")},
    }


def export_byoc(job_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Copy a job and add this package as ``app/custom/fedfms`` (bring-your-own-code flavour)."""
    job_dir, out_dir = Path(job_dir), Path(out_dir)
    if not (job_dir / "meta.json").is_file():
        raise ConfigError(f"{job_dir}: not a FLARE job folder (no meta.json)")
    if out_dir.exists():
        if not overwrite:
            raise ConfigError(f"{out_dir}: already exists; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    shutil.copytree(job_dir, out_dir)
    package = Path(__file__).resolve().parents[1]
    shutil.copytree(package, out_dir / "app" / "custom" / "fedfms", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out_dir


def executor_args(job_dir: str | Path) -> tuple[Path, dict]:
    path = Path(job_dir)
    configs = sorted(path.glob("app*/config/config_fed_client.json")) if path.is_dir() else []
    if not configs:
        raise ConfigError(f"{path}: no app*/config/config_fed_client.json; expected a FLARE job folder")
    try:
        return configs[0], json.loads(configs[0].read_text())["executors"][0]["executor"]["args"]
    except (KeyError, IndexError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{configs[0]}: no executors[0].executor.args ({exc})") from None


def job_model_config(job_dir: str | Path) -> dict:
    """The model_config a job's sites train with (to rebuild its model for prediction or checks)."""
    where, args = executor_args(job_dir)
    if "model_config" not in args:
        raise ConfigError(f"{where}: executor args have no model_config")
    return args["model_config"]


def job_train_config(job_dir: str | Path) -> dict:
    return executor_args(job_dir)[1].get("train_config", {})


def job_personalise(job_dir: str | Path) -> str | None:
    """The job's ``personalise`` setting (None: not personalised)."""
    return executor_args(job_dir)[1].get("personalise")


def components(config) -> list[tuple[str, dict]]:
    """(class path, args) of every component a job's JSON (a file's content, or several) names, nested ones too."""
    found: list[tuple[str, dict]] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str):
                found.append((node["path"], node.get("args") if isinstance(node.get("args"), dict) else {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def component_paths(job: dict[str, dict]) -> set[str]:
    """Every class path a rendered job instantiates."""
    return {path for path, _ in components(job)}
