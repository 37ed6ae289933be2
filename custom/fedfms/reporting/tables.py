"""The paper's Table 1 (leave-one-site-out Dice/IoU) and Table 2 (what a site trains, sends and computes).

Table 1 is laid out from the results ``fedfms loso`` writes (``<workspace>/loso_results.json``): one table per
dataset (runs are grouped by their sites), one column pair (Dice, IoU) per held-out site plus the average,
one row per method: FedSAM / FedMSA / FedU-Net / FednnU-Net and the same models trained centrally, named from the model
each fold trained. Table 2 is measured here: parameter counts and the bytes of the travel set from models
built on the meta device, FLOPs per image with ``torch.utils.flop_counter.FlopCounterMode``, and, only on a
GPU, step time, peak memory and prediction time.

FLARE-free: it reads JSON files and builds models; nothing here starts a federation.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from fedfms.errors import ConfigError, FedFMSError
from fedfms.evaluation.results import RESULTS_JSON  # what `fedfms loso` writes
from fedfms.evaluation.scoring import check_scoring
from fedfms.flavours import flavour_of, flavour_overrides
from fedfms.numbers import finite_mean, fmt_score
from fedfms.training.metrics import HONEST_RULE, reference_rule, reference_space
from fedfms.evaluation.personal import comparison_rows
from fedfms.models import ModelConfig
from fedfms.models import build_model_on_meta, count_parameters, local_spec, travel_bytes, travel_spec
from fedfms.data.synthetic import make_disc_site
from fedfms.training.trainer import LocalTrainer, TrainConfig


# which LOSO methods make a table: federated final global model with the centralised last epoch, or
# the federated best global model with the centralised best epoch (both picked on validation data only)
SELECTIONS = {
    "final": {"federated": "federated", "centralized": "centralized_last"},
    "best": {"federated": "federated_best", "centralized": "centralized"},
}
SELECTION_TEXT = {
    "final": "federated rows: the global model after the last round; centralised rows: the last epoch",
    "best": "federated rows: the global model with the best validation Dice of the training sites; centralised rows: "
            "the epoch with the best pooled validation Dice",
}

# known site sets (docs/datasets.md) -> the paper's dataset names
DATASETS = {
    "Prostate Cancer": ("BIDMC", "HK", "I2CVB", "ISBI", "ISBI1.5", "UCL"),
    "Brain Tumor (FeTS2022)": ("client1", "client6", "client18", "client21"),
    "Fundus": ("REFUGE", "ORIGA", "G1020", "Drishti-GS1"),
    "Nuclei": ("Adrenal_gland", "Esophagus", "Bile-duct", "Uterus", "MoNuSAC", "TNBC", "MoNuSeg"),
    "MNI152 demo (white matter)": ("site-1", "site-2", "site-3", "site-4"),
}

_SIZE_RANK = {"vit_b": 0, "vit_l": 1, "vit_h": 2, "tiny": 3}
_SIZE_SUFFIX = {"vit_b": "", "vit_l": "-L", "vit_h": "-H", "tiny": "-tiny"}
UNETS = {"unet": "U-Net", "nnunet": "nnU-Net"}  # the baselines from scratch: model variant -> row name, in row order


class TableError(FedFMSError):
    """A results folder cannot be read into a table."""


# ====================================================================================================
# Table 1


@dataclass
class LosoRun:
    """One ``fedfms loso`` workspace: its report, and what its folds trained."""

    path: Path
    report: dict
    model: dict
    train: dict
    flavour: str
    notes: list[str] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        return list(self.report.get("sites") or [])

    @property
    def held_out(self) -> list[str]:
        return list(self.report.get("held_out") or [])

    @property
    def rounds(self):
        return self.report.get("rounds")

    @property
    def classes(self) -> list[str]:
        for row in self.report.get("rows") or []:
            if row.get("classes"):
                return list(row["classes"])
        return []


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TableError(f"{path}: not found; expected {what}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: unreadable ({str(exc).splitlines()[0][:120]}); expected {what}") from None
    if not isinstance(data, dict):
        raise TableError(f"{path}: holds {type(data).__name__}; expected {what}")
    return data


def _fold_job_configs(workspace: Path, holdout: str) -> tuple[dict, dict] | None:
    """Model and train config from a fold's job folder (runs made before fold.json recorded them)."""
    for client in sorted((workspace / holdout / "job").glob("app*/config/config_fed_client.json")):
        try:
            args = json.loads(client.read_text())["executors"][0]["executor"]["args"]
            return dict(args["model_config"]), dict(args.get("train_config") or {})
        except (OSError, KeyError, IndexError, TypeError, json.JSONDecodeError):
            return None
    return None


def load_loso_run(path: str | os.PathLike) -> LosoRun:
    """A LOSO workspace (or its ``loso_results.json``). Raises :class:`TableError` with the reason."""
    path = Path(path)
    results = path if path.is_file() else path / RESULTS_JSON
    if not path.exists():
        raise TableError(f"{path}: no such folder; expected a 'fedfms loso' workspace")
    report = _read_json(results, "the loso_results.json that 'fedfms loso' writes in its workspace")
    if not isinstance(report.get("rows"), list) or "sites" not in report:
        raise TableError(f"{results}: no 'rows'/'sites'; expected the loso_results.json that 'fedfms loso' writes")
    if not report["rows"]:
        raise TableError(f"{results}: no finished folds yet; run 'fedfms loso' to the end first")
    workspace = results.parent
    model = train = None
    for fold in report.get("folds") or []:
        if isinstance(fold.get("model_config"), dict):
            model, train = fold["model_config"], fold.get("train_config") or {}
            break
        found = _fold_job_configs(workspace, str(fold.get("holdout")))
        if found:
            model, train = found
            break
    notes = []
    if model is None:
        model, train = _variant_guess(str(report.get("job", ""))), {}
        notes.append(f"{workspace}: the folds do not say what they trained; the method is named from the job "
                     f"{report.get('job')!r} and the flavour is unknown")
        flavour = "unknown"
    else:
        flavour = flavour_of(model, train)
    return LosoRun(workspace, report, dict(model), dict(train), flavour, notes)


def _variant_guess(job: str) -> dict:
    name = Path(job).name
    variant = ("nnunet" if "nnunet" in name else "unet" if "unet" in name else "vit_l" if name.endswith("_l")
               else "tiny" if name.endswith("_tiny") else "vit_b")
    mode = "fedsam" if "sam" in name or variant in UNETS else "fedmsa"
    return {"variant": variant, "mode": mode, "pretrained": variant not in ("tiny", *UNETS)}


def method_label(model: Mapping, centralized: bool) -> str:
    """The paper's row names: FedSAM, FedMSA, FedMSA-L, FedU-Net, FednnU-Net, ... with ``(-PT)`` for random init
    (SAM only: the U-Nets always start from scratch), and the centralised baseline (the paper's SAM/MSA rows)
    marked ``centralised``."""
    variant = model.get("variant", "vit_b")
    if variant in UNETS:
        base = UNETS[variant]
    else:
        base = ("SAM" if model.get("mode", "fedmsa") == "fedsam" else "MSA") + _SIZE_SUFFIX.get(variant, f"-{variant}")
    tags = []
    if variant not in UNETS and not model.get("pretrained", True):
        tags.append("-PT")
    if centralized:
        tags.append("centralised")
    return ("" if centralized else "Fed") + base + (f" ({', '.join(tags)})" if tags else "")


def _sort_key(model: Mapping, centralized: bool, flavour: str, index: int) -> tuple:
    variant = model.get("variant", "vit_b")
    # the U-Nets first (FedU-Net, then FednnU-Net), then SAM by size
    unet_rank = list(UNETS).index(variant) if variant in UNETS else 0
    return (variant not in UNETS, unet_rank, _SIZE_RANK.get(variant, 9), model.get("mode") != "fedsam",
            not model.get("pretrained", True), {"project": 0, "reference": 1}.get(flavour, 2), centralized, index)


def dataset_name(sites: Sequence[str], data_root: str | None = None) -> str:
    for name, known in DATASETS.items():
        if set(sites) <= set(known):
            return name
    if data_root:
        return Path(data_root).name
    return "sites " + ", ".join(sites)


@dataclass
class Table1:
    """One dataset's table: every method row with its per-site scores."""

    dataset: str
    sites: list[str]
    classes: list[str]
    rows: list[dict]  # {"label", "run", "method", "flavour", "rounds", "sites": {site: scores}}
    notes: list[str]
    # personalised runs: {"label", "personalise", "held_out_model", "personal": {site: {"global", "personal", "alone"}}}
    personal: list[dict] = field(default_factory=list)


def build_table1(run_dirs: Sequence[str | os.PathLike], select: str = "final") -> list[Table1]:
    """One :class:`Table1` per dataset among ``run_dirs`` (LOSO workspaces), rows in the paper's order."""
    if select not in SELECTIONS:
        raise ConfigError(f"select is {select!r}; expected one of {', '.join(SELECTIONS)}")
    if not run_dirs:
        raise ConfigError("table1 needs at least one 'fedfms loso' workspace")
    runs = [load_loso_run(p) for p in run_dirs]
    groups: dict[tuple, list[LosoRun]] = {}
    for run in runs:
        groups.setdefault((frozenset(run.sites), tuple(run.classes)), []).append(run)
    tables = []
    for (_, classes), members in groups.items():
        sites = members[0].sites
        notes = [n for r in members for n in r.notes]
        entries = []
        for index, run in enumerate(members):
            for kind, method in SELECTIONS[select].items():
                row = next((r for r in run.report["rows"] if r.get("method") == method), None)
                if row is None:
                    available = ", ".join(r.get("method", "?") for r in run.report["rows"])
                    if kind == "federated":
                        notes.append(f"{run.path}: no '{method}' results (it has: {available})"
                                     + ("; a 1-round run has no best global model" if method == "federated_best" else ""))
                    continue
                centralized = kind == "centralized"
                label = method_label(run.model, centralized)
                if run.report.get("personalise") and not centralized:
                    label += f" (personalised: {run.report['personalise']})"
                entries.append((_sort_key(run.model, centralized, run.flavour, index), {
                    "label": label, "run": str(run.path), "method": method,
                    "flavour": run.flavour, "rounds": run.rounds, "variant": run.model.get("variant"),
                    "sites": dict(row.get("sites") or {}),
                }))
                missing = [s for s in sites if s not in (row.get("sites") or {})]
                if missing:
                    notes.append(f"{method_label(run.model, centralized)} ({run.path.name}): not yet held out: "
                                 f"{', '.join(missing)}; its average covers the others only")
        rows = [e for _, e in sorted(entries, key=lambda e: e[0])]
        _disambiguate(rows)
        personal = [{"label": f"{method_label(r.model, False)} ({r.path.name})", "personalise": r.report["personalise"],
                     "held_out_model": r.report.get("held_out_model"), "personal": r.report.get("personal") or {}}
                    for r in members if r.report.get("personalise")]
        notes += [gap for r in members for gap in r.report.get("personal_gaps") or []]
        tables.append(Table1(dataset_name(sites, members[0].report.get("data_root")), list(sites), list(classes), rows,
                             notes, personal))
    return tables


def _disambiguate(rows: list[dict]) -> None:
    flavours = {r["flavour"] for r in rows}
    if len(flavours) > 1:
        for r in rows:
            r["label"] += f" [{r['flavour']} flavour]"
    seen: dict[str, int] = {}
    for r in rows:
        seen[r["label"]] = seen.get(r["label"], 0) + 1
    for r in rows:
        if seen[r["label"]] > 1:
            r["label"] += f" [{Path(r['run']).name}]"


_RULE_KEYS = {"honest": ("dice", "iou", "dice_per_class", "iou_per_class"),
              "reference": ("dice_reference", "iou_reference", "dice_reference_per_class", "iou_reference_per_class")}


def _value(scores: Mapping, scoring: str, metric: str, class_index: int | None):
    dice, iou, dice_c, iou_c = _RULE_KEYS[scoring]
    if class_index is None:
        v = scores.get(dice if metric == "dice" else iou)
    else:
        values = scores.get(dice_c if metric == "dice" else iou_c) or []
        v = values[class_index] if class_index < len(values) else None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def table1_cells(table: Table1, scoring: str) -> tuple[list[str], list[list[str]], list[list]]:
    """Header, formatted rows and raw values of one table under one rule (``honest`` or ``reference``)."""
    parts = [(None, "")] if len(table.classes) <= 1 else [(i, f" {c}") for i, c in enumerate(table.classes)]
    header = ["Model"]
    for group in [*table.sites, "Average"]:
        for _, cname in parts:
            header += [f"{group}{cname} Dice", f"{group}{cname} IoU"]
    formatted, raw = [], []
    for row in table.rows:
        cells, values = [row["label"]], [row["label"]]
        for group in [*table.sites, "Average"]:
            for ci, _ in parts:
                for metric in ("dice", "iou"):
                    if group == "Average":
                        v = finite_mean([_value(row["sites"][s], scoring, metric, ci) for s in table.sites if s in row["sites"]])
                    else:
                        v = _value(row["sites"][group], scoring, metric, ci) if group in row["sites"] else None
                    values.append(v)
                    cells.append(fmt_score(v))
        formatted.append(cells)
        raw.append(values)
    return header, formatted, raw


def _rule_text(scoring: str, table: Table1) -> str:
    if scoring == "honest":
        return HONEST_RULE
    spaces = {reference_space(r.get("variant") or "") for r in table.rows}
    if spaces == {"logits", "probabilities"}:
        names = [name for variant, name in UNETS.items() if any(r.get("variant") == variant for r in table.rows)]
        if len(names) == 1:
            return reference_rule("logits") + f" (the {names[0]} rows: on its sigmoid probabilities, as the authors' U-Net)"
        return (reference_rule("logits") + f" (the {' and '.join(names)} rows: on their sigmoid probabilities, "
                "as the authors' U-Net)")
    return reference_rule(spaces.pop() if spaces else "logits")


def _caption(table: Table1, scoring: str, select: str) -> str:
    rounds = sorted({str(r["rounds"]) for r in table.rows})
    flavours = sorted({r["flavour"] for r in table.rows})
    missing_rule = scoring == "reference" and any(
        "dice_reference" not in scores for r in table.rows for scores in r["sites"].values())
    parts = [
        "Leave-one-site-out: each column's site is the unseen test set, scored on all its samples; the other sites "
        "train, each split into train/validation by patient (the job's val_fraction; 0.1 = the paper's 9:1).",
        f"Scoring: {_rule_text(scoring, table)}.",
        f"Models: {SELECTION_TEXT[select]}, after {', '.join(rounds)} round(s) (centralised: as many epochs x local "
        "epochs). Rows without 'Fed' are the same model trained centrally on the pooled training sites (the paper's "
        "SAM/MSA rows).",
        f"Flavour: {', '.join(flavours)} (docs/evaluation.md). Average: unweighted mean over held-out sites.",
    ]
    if missing_rule:
        parts.append("'-': folds scored before this rule was recorded; run those folds again to fill them.")
    return " ".join(parts)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


SCORING_TITLES = {"honest": "this project's scoring rule", "reference": "the paper code's scoring rule"}


def _rules(scoring: str) -> tuple[str, ...]:
    check_scoring(scoring)
    return ("honest", "reference") if scoring == "both" else (scoring,)


def format_table1(tables: Sequence[Table1], scoring: str = "both", select: str = "final") -> str:
    """Markdown: per dataset and rule, a title, the table and its caption; notes last."""
    out = []
    for table in tables:
        for rule in _rules(scoring):
            header, rows, _ = table1_cells(table, rule)
            out.append(f"### Table 1: {table.dataset}, {SCORING_TITLES[rule]}\n")
            out.append(_markdown_table(header, rows) + "\n")
            out.append(f"*{_caption(table, rule, select)}*\n")
        for entry in table.personal:
            out.append(_personal_table(entry))
        for note in table.notes:
            out.append(f"- note: {note}")
        if table.notes:
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _personal_table(entry: Mapping) -> str:
    """A personalised run's second table: each site as a training site, on its own validation slices."""
    rows = comparison_rows(entry["personal"])
    body = [[r["site"], fmt_score(r["global"]), fmt_score(r["personal"]), fmt_score(r["alone"]),
             "-" if r["gap"] is None else f"{r['gap']:+.3f}" + (" (below)" if r["below"] else "")] for r in rows]
    header = ["training site", "global", "personalised", "alone", "personalised - max(global, alone)"]
    return (f"### Personalisation at the training sites: {entry['label']}, personalise {entry['personalise']}\n\n"
            + _markdown_table(header, body) + "\n\n*Validation Dice (this project's rule) on each site's own validation "
            "slices, averaged over the folds in which it trained; global: the final global model with the site's own local "
            "part; 'alone': the site's own data only (only with 'alone' in --personalise); '(below)': more than 0.02 under "
            f"the better of global and alone. In the table above, each held-out site got {entry['held_out_model']}.*\n")


def write_table1_csv(tables: Sequence[Table1], path: str | os.PathLike, scoring: str = "both", select: str = "final") -> Path:
    """Long format: dataset, scoring, model, flavour, rounds, selection, held-out site (or 'average'), class
    ('all' = mean over classes), Dice, IoU, run folder."""
    path = Path(path)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["dataset", "scoring", "model", "flavour", "rounds", "selection", "held_out_site", "class",
                         "dice", "iou", "run"])
        for table in tables:
            parts = [(None, "all")] + ([(i, c) for i, c in enumerate(table.classes)] if len(table.classes) > 1 else [])
            for rule in _rules(scoring):
                for row in table.rows:
                    for group in [*table.sites, "average"]:
                        for ci, cname in parts:
                            if group == "average":
                                d, i = (finite_mean([_value(row["sites"][s], rule, m, ci) for s in table.sites if s in row["sites"]])
                                        for m in ("dice", "iou"))
                            elif group in row["sites"]:
                                d, i = (_value(row["sites"][group], rule, m, ci) for m in ("dice", "iou"))
                            else:
                                continue
                            writer.writerow([table.dataset, rule, row["label"], row["flavour"], row["rounds"], select, group,
                                             cname, "" if d is None else f"{d:.6f}", "" if i is None else f"{i:.6f}", row["run"]])
    return path


# ====================================================================================================
# Table 2

TABLE2_VARIANTS = ("tiny", "vit_b", "vit_l", "unet")
ATTENTIONS = ("fused", "stock")


def _model_config(variant: str, mode: str, num_classes: int, attention: str, flavour: str, local_parts=()):
    o = flavour_overrides(flavour, variant)["model"]
    if variant == "unet":
        if "decoder" in local_parts:
            raise ConfigError("--personalise decoder: the U-Net has no mask decoder; leave unet out of --variants")
        return ModelConfig("unet", "fedsam", num_classes=num_classes, pretrained=False, local_parts=local_parts, **o)
    return ModelConfig(variant, mode, num_classes=num_classes, pretrained=False, fused_attention=attention == "fused",
                       local_parts=local_parts, **o)


def count_flops(model: torch.nn.Module, train: bool, device: str | torch.device = "meta") -> int:
    """FLOPs of one image through ``model`` (inference: forward; training: forward + BCE loss + backward),
    counted by ``FlopCounterMode`` from the operators that actually run. On the meta device (no memory, no
    data) attention runs as its math composite, so its matrix products are counted; on CPU PyTorch's fused
    attention kernel has no FLOP formula and would count as 0."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.image_size
    x = torch.zeros(1, 3, size, size, device=device)
    model.train(train)
    # grad mode stays on for inference too: FlopCounterMode's module tracker fails on outputs made under
    # no_grad; the forward's operators (and so its FLOPs) are the same
    with FlopCounterMode(display=False) as counter:
        logits = model(x)
        if train:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
            loss.backward()
    return int(counter.get_total_flops())


def static_costs(variant: str, mode: str, num_classes: int = 1, attention: str = "fused", flavour: str = "project",
                 local_parts=()) -> dict:
    """Parameters, bytes sent per site per round and FLOPs per image, from a model built on the meta device.
    ``local_parts``: a personalised job's part kept at each site (``fedfms.models.travel``), which is not sent."""
    cfg = _model_config(variant, mode, num_classes, attention, flavour, tuple(local_parts))
    model = build_model_on_meta(cfg)
    spec = travel_spec(model, cfg.mode, cfg.local_parts)
    return {
        "variant": variant, "mode": cfg.mode, "num_classes": num_classes, "image_size": model.image_size,
        "local_parts": list(cfg.local_parts), "local_bytes_fp32": travel_bytes(local_spec(model, cfg.mode, cfg.local_parts)),
        "attention": None if variant == "unet" else attention, "flavour": flavour,
        "total_params": count_parameters(model), "trainable_params": count_parameters(model, trainable_only=True),
        "bytes_fp32": travel_bytes(spec), "bytes_16bit": travel_bytes(spec, bytes_per_value=2),
        "flops_train": count_flops(model, train=True), "flops_inference": count_flops(model, train=False),
    }


def gpu_costs(variant: str, mode: str, num_classes: int = 1, attention: str = "fused", flavour: str = "project",
              batch_size: int = 6, steps: int = 5, warmup: int = 2, device: str = "cuda") -> dict:
    """Seconds per training step (``LocalTrainer.step``: forward, BCE, backward, Adam; bf16 autocast on CUDA as
    in training) at ``batch_size``, peak memory of those steps, and seconds per predicted image (batch 1).
    Random weights and random data: speed and memory do not depend on the values. Meant for a GPU; callable on
    CPU for tests, but the table never shows a CPU figure in place of a GPU one."""
    cfg = _model_config(variant, mode, num_classes, attention, flavour)
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    if num_classes != 1:
        raise ConfigError(f"num_classes is {num_classes}: the timings train on a one-class site; use 1 (the head's size "
                          "does not change the times)")
    with tempfile.TemporaryDirectory() as tmp:
        # LocalTrainer wants a site; the steps below feed it tensors of the model's own size
        site = make_disc_site(Path(tmp) / "site", num_volumes=2, slices_per_volume=2, seed=0)
        trainer = LocalTrainer(cfg, TrainConfig(batch_size=batch_size, device=device, progress=False,
                                                **flavour_overrides(flavour)["train"]), str(site))
    size, mask = trainer.model.image_size, trainer.model.mask_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, size, size, generator=gen)
    masks = (torch.rand(batch_size, num_classes, mask, mask, generator=gen) > 0.5).float()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        trainer.step(images, masks)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(dev) if cuda else None
    trainer.model.eval()
    one = images[:1].to(dev)
    predict = []
    with torch.no_grad():
        for i in range(warmup + steps):
            sync()
            start = time.perf_counter()
            with trainer._autocast():
                trainer.model(one)
            sync()
            if i >= warmup:
                predict.append(time.perf_counter() - start)
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return {"batch_size": batch_size, "step_s": statistics.median(times), "peak_bytes": peak,
            "predict_s": statistics.median(predict), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu"}


def build_table2(variants: Sequence[str] = TABLE2_VARIANTS, num_classes: int = 1, attention: str = "fused",
                 flavour: str = "project", gpu: bool | None = None, batch_size: int = 6, steps: int = 5,
                 log=None, local_parts=()) -> list[dict]:
    """One row per variant and mode (the U-Net: one row). ``gpu``: None measures times when CUDA is present.
    ``local_parts``: bytes of a personalised job that keeps these parts at each site (``--personalise``)."""
    unknown = [v for v in variants if v not in TABLE2_VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"variants {list(variants)}: expected some of {', '.join(TABLE2_VARIANTS)}")
    if attention not in ATTENTIONS:
        raise ConfigError(f"attention is {attention!r}; expected one of {', '.join(ATTENTIONS)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes is {num_classes}; expected >= 1")
    flavour_overrides(flavour)  # a one-line error for an unknown flavour
    if gpu is None:
        gpu = torch.cuda.is_available()
    elif gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu: no CUDA device here; step time, peak memory and predict time need a GPU")
    rows = []
    for variant in variants:
        for mode in (("fedsam",) if variant == "unet" else ("fedsam", "fedmsa")):
            start = time.perf_counter()
            row = static_costs(variant, mode, num_classes, attention, flavour, local_parts)
            if gpu:
                try:
                    row.update(gpu_costs(variant, mode, num_classes, attention, flavour, batch_size, steps))
                except torch.cuda.OutOfMemoryError:
                    row["gpu_error"] = f"out of memory at batch {batch_size}"
                    torch.cuda.empty_cache()
            if log:
                log(f"  {variant} {row['mode']}: {time.perf_counter() - start:.1f} s")
            rows.append(row)
    return rows


def _flops(v: int) -> str:
    if v >= 1e11:
        return f"{v / 1e12:.2f} T"
    if v >= 1e8:
        return f"{v / 1e9:.2f} G"
    return f"{v / 1e6:.2f} M"


def _mb(v: int) -> str:
    return f"{v / 1e6:.1f}" if v >= 1e6 else f"{v / 1e6:.3f}"


def _size(v: int) -> str:
    return f"{v:,} B" if v < 1e4 else f"{v / 1e3:.1f} kB" if v < 1e6 else f"{v / 1e6:.1f} MB"


MODEL_NAMES = {"tiny": "SAM tiny", "vit_b": "SAM ViT-B", "vit_l": "SAM ViT-L", "unet": "U-Net"}


NEEDS_GPU = "needs a GPU"


def table2_cells(rows: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    batch = next((r["batch_size"] for r in rows if "batch_size" in r), 6)
    header = ["model", "mode", "total params", "trainable params", "sent/site/round fp32 (MB)", "16-bit (MB)",
              "train FLOPs/image", "inference FLOPs/image", f"step s (batch {batch})", "peak GPU memory (GiB)",
              "predict s/image"]
    body = []
    for r in rows:
        model = MODEL_NAMES.get(r["variant"], r["variant"])
        mode = "FedU-Net" if r["variant"] == "unet" else {"fedsam": "FedSAM", "fedmsa": "FedMSA"}[r["mode"]]
        if r.get("local_parts"):
            mode += f" ({', '.join(r['local_parts'])} local: {_size(r['local_bytes_fp32'])} kept)"
        if "step_s" in r:
            timing = [f"{r['step_s']:.3f}", "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.1f}",
                      f"{r['predict_s']:.4f}"]
        elif "gpu_error" in r:
            timing = [r["gpu_error"]] * 3
        else:
            timing = [NEEDS_GPU] * 3
        body.append([model, mode, f"{r['total_params']:,}", f"{r['trainable_params']:,}", _mb(r["bytes_fp32"]),
                     _mb(r["bytes_16bit"]), _flops(r["flops_train"]), _flops(r["flops_inference"]), *timing])
    return header, body


def format_table2(rows: Sequence[Mapping]) -> str:
    header, body = table2_cells(rows)
    r0 = rows[0]
    sizes = sorted({f"{MODEL_NAMES.get(r['variant'], r['variant'])} {r['image_size']} px"
                    + (" (it works at a quarter of that)" if r["variant"] == "unet" else "") for r in rows})
    gpu = next((r for r in rows if "step_s" in r), None)
    attention = next((r["attention"] for r in rows if r.get("attention")), None)
    caption = [
        f"Per site; {r0['num_classes']}-class head; flavour {r0['flavour']}; inputs {', '.join(sizes)}.",
        "Parameters and bytes: the travel set (fedfms.models.travel): FedSAM sends every tensor, FedMSA the adapters, "
        "mask decoder and head; MB = 10^6 bytes; 16-bit = --transfer float16.",
        "FLOPs: one image, counted by torch.utils.flop_counter.FlopCounterMode on the meta device (a multiply-add = 2 "
        "FLOPs); training = forward + BCE loss + backward (no optimiser step); inference = forward"
        + (f"; SAM attention: {attention} (models/attention.py; 'stock' = segment-anything's)" if attention else "") + ".",
    ]
    parts = sorted({p for r in rows for p in r.get("local_parts") or []})
    if parts:
        caption.append(f"Personalised ({', '.join(parts)} kept at each site, never sent): the bytes are what still travels "
                       "(fedfms.models.travel.local_keys); parameter counts and FLOPs are the whole model's.")
    if gpu:
        caption.append(f"Times and memory: measured on {gpu['device_name']} ({gpu['device']}), random weights, "
                       f"LocalTrainer.step at batch {gpu['batch_size']} (bf16 autocast as in training), median after "
                       "warm-up; predict: one image, median.")
    else:
        caption.append("Step time, peak memory and predict time: not measured, no GPU here (a CPU figure would not be "
                       "comparable with the paper's GPU numbers); run 'fedfms table2' on a GPU machine.")
    return "### Table 2: cost per site\n\n" + _markdown_table(header, body) + "\n\n*" + " ".join(caption) + "*\n"


def write_table2_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    keys = ["variant", "mode", "local_parts", "local_bytes_fp32", "num_classes", "image_size", "attention", "flavour",
            "total_params", "trainable_params",
            "bytes_fp32", "bytes_16bit", "flops_train", "flops_inference", "batch_size", "step_s", "peak_bytes",
            "predict_s", "device_name"]
    path = Path(path)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for r in rows:
            writer.writerow(["" if r.get(k) is None else "+".join(r[k]) if k == "local_parts" else r.get(k) for k in keys])
    return path
