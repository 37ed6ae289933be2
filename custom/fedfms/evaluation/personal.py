"""Reading back a personalised federation, FLARE-free: the server's record of what every site's personalised model
scored (``fedfms_personal.json``), and the one comparison every report shows per site: the global model, the
site's personalised model and the site alone, on the same validation slices (the site's own validation split).

What "global" means when part of the model is local: the final global model's shared part *with that site's local
part* (the only way the shared part runs there); with no local part (``finetune:N`` only) it is the global model
itself. FLARE's cross-site evaluation of the global model at a site means the same.

A site that never joined (the held-out site of leave-one-site-out) has no local part: it gets the final global
model, with the model's initial local part where the job keeps one (``norm``: the initial, e.g. pretrained SAM's,
normalisation layers). A local head or decoder has no such stand-in (the initial one never trained), so
leave-one-site-out refuses those jobs (:func:`held_out_model`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from fedfms.errors import ConfigError
from fedfms.numbers import finite_mean, fmt_score, render_table
from fedfms.training.personal import MODEL_FILES, NOISE_DICE, PERSONAL_DIR, SCORE_KEYS, SITE_MODEL_KEY, Personalisation

PERSONAL_RECORD = "fedfms_personal.json"  # in the server's run folder, beside fedfms_run.json
KINDS = ("global", "personal", "alone")
KIND_LABELS = {"global": "global", "personal": "personalised", "alone": "alone"}
_ENTRY_KEYS = {"global", "personal", "alone", "alone_epochs", "files"}
_SCORE_FIELDS = set(SCORE_KEYS) | {"classes", "dice_per_class"}


def site_entry_problems(entry) -> list[str]:
    """Why a site's answer to the personalisation step is not a plain record of scores (empty: it is). Only
    scores and file names may come back: a model, or anything else, in the answer is refused."""
    if not isinstance(entry, Mapping):
        return [f"answer is a {type(entry).__name__}, expected a dict of scores"]
    problems = []
    extra = sorted(set(entry) - _ENTRY_KEYS)
    if extra:
        problems.append(f"unexpected field(s) {extra[:3]} (only scores leave a site)")
    for kind in ("global", "personal"):
        if not isinstance(entry.get(kind), Mapping):
            problems.append(f"no {kind} scores")
    for kind in KINDS:
        scores = entry.get(kind)
        if not isinstance(scores, Mapping):
            continue
        unknown = sorted(set(scores) - _SCORE_FIELDS)
        if unknown:
            problems.append(f"{kind} scores hold unexpected field(s) {unknown[:3]}")
        for key in ("dice", "iou", "volume_dice", "volume_iou", "dice_reference", "iou_reference"):
            v = scores.get(key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v <= 1):
                problems.append(f"{kind} {key} is {v!r}, expected a number in [0, 1]")
        per_class = scores.get("dice_per_class")
        if per_class is not None and (not isinstance(per_class, list) or len(per_class) > 1000):
            problems.append(f"{kind} dice_per_class is not a short list")
    files = entry.get("files")
    if files is not None and (not isinstance(files, Mapping) or not all(isinstance(v, str) for v in files.values())):
        problems.append("files is not a dict of file names")
    return problems


def read_personal_record(run_dir: str | Path) -> dict | None:
    """The server's personalisation record in a run folder (or the file itself); None for a run without one."""
    path = Path(run_dir)
    if path.is_dir():
        found = sorted(path.rglob(PERSONAL_RECORD), key=lambda p: (len(p.parts), str(p)))
        if not found:
            return None
        path = found[0]
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def personal_gaps(record: Mapping | None) -> list[str]:
    """One line per site that has no personalised model (and why)."""
    if not record:
        return []
    return [f"{site}: no personalised model ({info.get('reason', 'unknown reason')})"
            for site, info in sorted((record.get("sites") or {}).items()) if info.get("status") != "ok"]


def shortfall(personal, global_, alone) -> float | None:
    """How far the personalised Dice is below the better of the global and the site-alone Dice (positive: below)."""
    others = [v for v in (global_, alone) if isinstance(v, (int, float)) and math.isfinite(v)]
    if personal is None or not others:
        return None
    return max(others) - personal


def comparison_rows(per_site: Mapping[str, Mapping], noise: float = NOISE_DICE) -> list[dict]:
    """``per_site``: site -> {"global", "personal", "alone": Dice or None}. One row per site (and the mean), with
    ``gap`` = personalised - max(global, alone) and ``below`` when the personalised model is worse than that by
    more than ``noise``."""
    rows = []
    for site, v in per_site.items():
        g, p, a = (v.get(k) for k in KINDS)
        short = shortfall(p, g, a)
        rows.append({"site": site, "global": g, "personal": p, "alone": a,
                     "gap": None if short is None else -short, "below": short is not None and short > noise})
    if len(rows) > 1:
        mean = {k: finite_mean([r[k] for r in rows]) for k in KINDS}
        short = shortfall(mean["personal"], mean["global"], mean["alone"])
        rows.append({"site": "mean", **mean, "gap": None if short is None else -short, "below": False})
    return rows


def format_comparison(rows: Sequence[Mapping], noise: float = NOISE_DICE, labels: Mapping[str, str] | None = None) -> str:
    """The per-site table: global, personalised, alone, personalised - max(global, alone), and a flag where the
    personalised model is below the better of the other two by more than ``noise``."""
    labels = {**KIND_LABELS, **(labels or {})}
    flagged = any(r.get("below") for r in rows)
    header = ["site", labels["global"], labels["personal"], labels["alone"], "personalised - max(global, alone)"]
    body = []
    for r in rows:
        gap = r.get("gap")
        body.append([r["site"], fmt_score(r.get("global")), fmt_score(r.get("personal")), fmt_score(r.get("alone")),
                     "-" if gap is None else f"{gap:+.3f}"])
        if flagged:
            body[-1].append(f"below by {-gap:.3f} (> {noise})" if r.get("below") else "")
    if flagged:
        header.append("flag")
    return "\n".join(line.rstrip() for line in render_table(header, body).splitlines())


def record_dice(record: Mapping) -> dict[str, dict]:
    """site -> {"global", "personal", "alone"} validation Dice from a personalisation record (sites that have one)."""
    out = {}
    for site, info in sorted((record.get("sites") or {}).items()):
        if info.get("status") == "ok":
            out[site] = {k: (info.get(k) or {}).get("dice") for k in KINDS}
    return out


def describe_record(record: Mapping) -> str:
    """One line: the setting in words and what "global" means under it."""
    try:
        setting = Personalisation.parse(record.get("personalise"))
    except ConfigError:
        setting = None
    if setting is None:
        return f"personalisation: {record.get('personalise')!r}"
    meaning = ("the final global model's shared part with the site's own " + ", ".join(setting.local_parts) + " part"
               if setting.local_parts else "the final global model")
    alone = (f"; alone: the site's own data only, {record.get('alone_epochs')} epochs from the same start"
             if setting.alone else "; alone: not trained (add 'alone' to --personalise)")
    return (f"personalisation {setting}: {setting.describe()}. Validation Dice on each site's own validation split; "
            f"global: {meaning}{alone}")


def format_record(record: Mapping, noise: float = NOISE_DICE) -> str:
    """What ``fedfms report`` prints for a personalised run."""
    lines = [describe_record(record), format_comparison(comparison_rows(record_dice(record), noise), noise)]
    lines += [f"warning: {gap}" for gap in personal_gaps(record)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# held-out sites and site model files


def held_out_model(model_config: Mapping) -> str:
    """Which model a site that never joined the federation (LOSO's held-out site) is scored with, in words; a job
    whose local part has no stand-in for such a site (a local head or decoder) is refused."""
    parts = tuple(model_config.get("local_parts") or ())
    if not parts:
        return "the final global model"
    if "head" in parts or "decoder" in parts:
        raise ConfigError(f"the job keeps the {' and '.join(p for p in parts if p != 'norm')} at each site: a held-out site, "
                          "which never trained, has none of its own to run the global model with; leave-one-site-out "
                          "needs a job whose held-out site can use the global model (personalise norm and/or finetune:N)")
    return ("the final global model's shared part with the model's initial normalisation layers (a held-out site has "
            "no local part of its own)")


def site_model_info(path: str | Path) -> dict | None:
    """What a site model file (``fedfms_personal/*.pt``) says about itself; None for any other weights file."""
    import torch

    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    info = obj.get(SITE_MODEL_KEY) if isinstance(obj, dict) else None
    return dict(info) if isinstance(info, dict) else None


def describe_site_model(info: Mapping) -> str:
    kind = {"global": "the final global model with its local part", "personal": "its personalised model",
            "alone": "its site-alone model"}.get(info.get("kind"), str(info.get("kind")))
    return f"{info.get('site', '?')}'s {kind} ({info.get('personalise', '')})"


def site_model_files(site_run_dir: str | Path) -> dict[str, Path]:
    """kind -> file of the site models a site saved in its run folder."""
    folder = Path(site_run_dir) / PERSONAL_DIR
    return {kind: folder / name for kind, name in MODEL_FILES.items() if (folder / name).is_file()}
