"""What a leave-one-site-out workspace holds, read back: the finished folds gathered into table rows
(:func:`collect`), the long-format CSV (:func:`write_csv`) and the console table in the paper's Table 1 layout
(:func:`format_loso_table`). FLARE-free: it reads and writes JSON/CSV files only.

Also the small file helpers every fold record goes through (:func:`json_safe`, :func:`write_json`)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from fedfms.errors import FedFMSError
from fedfms.evaluation.scoring import ALL_SUMMARY_KEYS, PER_CLASS_KEYS, check_scoring, scoring_keys, scoring_notes
from fedfms.numbers import finite_mean, fmt_score
from fedfms.training.metrics import reference_rule, reference_space

RESULTS_JSON = "loso_results.json"
RESULTS_CSV = "loso_results.csv"
FOLD_FILE = "fold.json"

# method key -> what the row is. "best" models were picked on the training sites' validation data only.
METHODS = {
    "federated": "federated, final global model",
    "federated_best": "federated, best global model",
    "centralized": "centralized, best epoch",
    "centralized_last": "centralized, last epoch",
}


class EvaluationError(FedFMSError):
    """A fold could not be completed (the federation failed or left no global model). ``summary``: the short
    reason the fold's record keeps (default: the message)."""

    def __init__(self, message: str, summary: str | None = None):
        super().__init__(message)
        self.summary = summary


# ----------------------------------------------------------------------------------------------------
# files


def json_safe(v):
    """``v`` with non-finite floats as None (JSON has no NaN; an unscorable metric is stored as null)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [json_safe(x) for x in v]
    return v


def plain(obj):
    """``obj`` as JSON reads it back (tuples as lists, ...): what a signature is compared as."""
    return json.loads(json.dumps(obj))


def write_json(path: Path, data) -> None:
    """Write ``data`` whole or not at all (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def fold_scores(row: Mapping, weights: Path) -> dict:
    """What a fold's record keeps of one model's score row (``fedfms.evaluation.scoring.evaluate_sites``)."""
    keep = (*ALL_SUMMARY_KEYS, *PER_CLASS_KEYS, "reference_thresholds", "reference_on", "classes", "num_samples",
            "num_slices", "num_volumes")
    return {**{k: json_safe(row.get(k)) for k in keep}, "weights": str(weights)}


# ----------------------------------------------------------------------------------------------------
# gathering the folds


def collect(workspace: str | Path, signature: Mapping) -> tuple[list[dict], dict]:
    """Rows of every finished fold under ``workspace`` run with ``signature``, and the full report."""
    workspace = Path(workspace)
    signature = plain(signature)
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
    report.update(personal_summary([folds[s] for s in held_out]))
    return rows, report


def personal_summary(folds: Sequence[Mapping]) -> dict:
    """A personalised job's folds: each site, as a training site, its global / personalised / alone validation Dice
    averaged over the folds it trained in (``personal``), the setting and which model the held-out site got."""
    personalised = [f for f in folds if f.get("personalise")]
    if not personalised:
        return {}
    per_site: dict[str, dict[str, list]] = {}
    for fold in personalised:
        for site, values in (fold.get("personal") or {}).items():
            for kind, v in values.items():
                per_site.setdefault(site, {}).setdefault(kind, []).append(v)
    return {"personalise": personalised[0]["personalise"], "held_out_model": personalised[0].get("held_out_model"),
            "personal": {site: {kind: finite_mean(vs) for kind, vs in kinds.items()} for site, kinds in sorted(per_site.items())},
            "personal_gaps": [f"fold {f['holdout']}: {gap}" for f in personalised for gap in f.get("personal_gaps") or []]}


def _reference_rule_of(folds: Mapping) -> str:
    variants = {(f.get("model_config") or {}).get("variant") for f in folds.values()} - {None}
    return reference_rule(reference_space(variants.pop()) if len(variants) == 1 else "logits")


# ----------------------------------------------------------------------------------------------------
# CSV and console table


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
