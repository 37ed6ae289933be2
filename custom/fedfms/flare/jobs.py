"""The single source of truth for the FLARE jobs in ``jobs/``.

Each variant is a few configuration values; :func:`render_job` turns them into FLARE's classic JSON job
(``meta.json`` + ``app/config/config_fed_{server,client}.json``). ``fedfms job generate`` rewrites
``jobs/`` and a test checks the checked-in JSON still equals what this module renders.

The checked-in jobs carry no custom code (the production flavour: ``fedfms`` is pre-installed at every
site and allowed by ``class_allow_list``). :func:`export_byoc` adds ``app/custom/fedfms`` for federations
that grant the bring-your-own-code right instead.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from fedfms.errors import ConfigError
from fedfms.flare.executor import KEY_METRIC
from fedfms.flare.site_config import DEFAULT_CHECKPOINT, DEFAULT_DATA_DIR
from fedfms.models import ModelConfig
from fedfms.training.trainer import TrainConfig

PAPER_TRAIN = {"epochs": 1, "batch_size": 6, "lr": 1e-4, "betas": [0.9, 0.999], "loss": "bce", "val_fraction": 0.1}
CPU_TRAIN = {"epochs": 1, "batch_size": 6, "lr": 1e-3, "betas": [0.9, 0.999], "loss": "bce_dice", "val_fraction": 0.2,
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
    "fedsam_tiny": {"model": _tiny("fedsam"), "train": CPU_TRAIN, "num_rounds": 2, "task_request_interval": 0.5},
    "fedmsa_tiny": {"model": _tiny("fedmsa"), "train": CPU_TRAIN, "num_rounds": 2, "task_request_interval": 0.5},
}


def variant_settings(name: str, **overrides) -> dict:
    """A variant's settings with overrides: num_rounds, min_clients, num_classes, data_dir, transfer,
    task_request_interval, train (dict, merged), model (dict, merged)."""
    if name not in VARIANTS:
        raise ConfigError(f"job variant is {name!r}; expected one of {sorted(VARIANTS)}")
    s = copy.deepcopy(VARIANTS[name])
    s.setdefault("min_clients", 2)
    s.setdefault("data_dir", DEFAULT_DATA_DIR)
    s.setdefault("transfer", "float32")
    s.setdefault("task_request_interval", 2.0)  # FLARE's default wait of a site between two tasks
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "num_classes":
            s["model"]["num_classes"] = int(value)
        elif key in ("model", "train"):
            s[key].update(value)
        elif key in ("num_rounds", "min_clients", "data_dir", "task_request_interval"):
            s[key] = value
        elif key == "transfer":
            if value not in TRANSFER_TYPES:
                raise ConfigError(f"transfer is {value!r}; expected one of {TRANSFER_TYPES}")
            s[key] = value
        else:
            raise ConfigError(f"unknown job setting {key!r}; expected num_rounds, min_clients, num_classes, data_dir, "
                              "transfer, task_request_interval, model, train")
    # a typo must fail here, not at every site when the job starts
    ModelConfig.from_dict(s["model"], f"job {name}: model")
    TrainConfig.from_dict(s["train"], f"job {name}: train")
    return s


# Models travel as float32, or as float16 through FLARE's own quantisation filters (half the bytes; the
# receiving side restores float32 before anything is checked, averaged or trained).
TRANSFER_TYPES = ("float32", "float16")
QUANTIZER = "nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer"
DEQUANTIZER = "nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer"
MODEL_TASKS_OUT = ["train", "validate"]  # tasks whose data carries a model to the sites
MODEL_TASKS_BACK = ["train", "submit_model"]  # tasks whose results carry a model back


def _quantize(s: dict) -> list[dict]:
    if s["transfer"] == "float32":
        return []
    return [{"path": QUANTIZER, "args": {"quantization_type": s["transfer"]}}]


def _dequantize(s: dict) -> list[dict]:
    return [] if s["transfer"] == "float32" else [{"path": DEQUANTIZER, "args": {}}]


def _filter_chain(tasks: list[str], filters: list[dict]) -> list[dict]:
    return [{"tasks": tasks, "filters": filters}] if filters else []


def _component(cid: str, path: str, args: dict | None = None) -> dict:
    return {"id": cid, "path": path, "args": args or {}}


def server_config(s: dict) -> dict:
    model = s["model"]
    return {
        "format_version": 2,
        "num_rounds": s["num_rounds"],
        "min_clients": s["min_clients"],
        "server": {"task_request_interval": s["task_request_interval"]},
        "task_data_filters": _filter_chain(MODEL_TASKS_OUT, _quantize(s)),
        "task_result_filters": _filter_chain(MODEL_TASKS_BACK, _dequantize(s)),
        "components": [
            _component("persistor", "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
                       {"model": {"path": "fedfms.flare.global_model.TravelSetModel", "args": model}}),
            _component("shareable_generator",
                       "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator"),
            _component("aggregator", "fedfms.flare.aggregator.CheckedFedAvgAggregator",
                       {"model_config": model, "expected_data_kind": "WEIGHTS"}),
            _component("model_selector", "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector",
                       {"key_metric": KEY_METRIC, "weigh_by_local_iter": True}),
            _component("model_locator", "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator",
                       {"pt_persistor_id": "persistor"}),
            _component("json_generator", "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator"),
            _component("tb_receiver", "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
                       {"events": ["fed.analytix_log_stats"]}),
        ],
        "workflows": [
            _component("scatter_and_gather", "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather", {
                "min_clients": "{min_clients}",
                "num_rounds": "{num_rounds}",
                "start_round": 0,
                "wait_time_after_min_received": 10,
                "aggregator_id": "aggregator",
                "persistor_id": "persistor",
                "shareable_generator_id": "shareable_generator",
                "train_task_name": "train",
                "train_timeout": 0,
                # one failing or refused site must not stop the federation; the others carry on
                "ignore_result_error": True,
            }),
            _component("cross_site_validate", "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval",
                       {"model_locator_id": "model_locator", "submit_model_timeout": 600, "validation_timeout": 6000}),
        ],
    }


def client_config(s: dict) -> dict:
    model = s["model"]
    return {
        "format_version": 2,
        "executors": [{
            "tasks": ["train", "validate", "submit_model"],
            "executor": _component("executor", "fedfms.flare.executor.FedFMSExecutor", {
                "model_config": model, "train_config": s["train"], "data_dir": s["data_dir"],
            }),
        }],
        # the travel-set check runs first, on the float32 weights the site computed
        "task_result_filters": _filter_chain(MODEL_TASKS_BACK, [
            {"path": "fedfms.flare.filters.TravelSetFilter", "args": {"mode": model["mode"], "model_config": model}},
            *_quantize(s),
        ]),
        "task_data_filters": _filter_chain(MODEL_TASKS_OUT, _dequantize(s)),
        "components": [
            _component("tb_writer", "nvflare.app_opt.tracking.tb.tb_writer.TBWriter"),
            _component("event_to_fed", "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
                       {"events_to_convert": ["analytix_log_stats"], "fed_event_prefix": "fed."}),
        ],
    }


def render_job(name: str, **overrides) -> dict[str, dict]:
    """Relative path -> JSON content of every file of the job."""
    s = variant_settings(name, **overrides)
    return {
        "meta.json": {"name": name, "resource_spec": {}, "min_clients": s["min_clients"],
                      "deploy_map": {"app": ["@ALL"]}},
        "app/config/config_fed_server.json": server_config(s),
        "app/config/config_fed_client.json": client_config(s),
    }


def write_job(name: str, out_dir: str | Path, overwrite: bool = False, **overrides) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir}: job folder already exists; pass --overwrite to replace it")
    for rel, content in render_job(name, **overrides).items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    return out_dir


def generate_all(jobs_root: str | Path) -> list[Path]:
    """(Re)write every variant under ``jobs_root``: what is checked in."""
    return [write_job(name, Path(jobs_root) / name, overwrite=True) for name in VARIANTS]


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


def _executor_args(job_dir: str | Path) -> tuple[Path, dict]:
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
    where, args = _executor_args(job_dir)
    if "model_config" not in args:
        raise ConfigError(f"{where}: executor args have no model_config")
    return args["model_config"]


def job_train_config(job_dir: str | Path) -> dict:
    return _executor_args(job_dir)[1].get("train_config", {})


def component_paths(job: dict[str, dict]) -> set[str]:
    """Every class path a rendered job instantiates."""
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("path"), str):
                found.add(node["path"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(job)
    return found


def class_allow_list() -> list[str]:
    """The ``class_allow_list`` a site needs to run every job here without custom code: the stock FLARE
    classes the jobs name exactly, and this package by prefix (a prefix entry ends with a dot)."""
    stock = set()
    for name in VARIANTS:
        for transfer in TRANSFER_TYPES:
            stock |= {p for p in component_paths(render_job(name, transfer=transfer)) if not p.startswith("fedfms.")}
    return sorted(stock) + ["fedfms."]
