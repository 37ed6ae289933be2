"""The model card of a finished run: what produced a model, in Markdown for people and JSON for programs.

Every number comes from the run's own outputs, read by the same functions ``fedfms report`` uses: the run record
of the server's federation monitor (``fedfms_run.json``: rounds, who contributed with how many samples, who missed
what and why), FLARE's cross-site evaluation (``cross_val_results.json``: Dice/IoU of each model at each site under
this project's rule and the paper code's), the job the sites ran (its deployed JSON: model, training, privacy
settings) and, with ``data_root``, the sites' manifests (sample counts, preparation preset). A leave-one-site-out
fold's held-out scores come from its ``fold.json``. Nothing is recomputed, so the card says what the run says.

Written by ``fedfms report RUN --card DIR`` and with every ``fedfms export bundle``. FLARE-free.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import time
from pathlib import Path

from fedfms.errors import DataError
from fedfms.numbers import finite_mean, fmt_score
from fedfms.reporting.run_report import read_cross_site
from fedfms.run_record import find_run_dir
from fedfms.run_record import RUN_RECORD, read_run_record, site_summary, summarize
from fedfms.flavours import flavour_of
from fedfms.data.site_dataset import read_manifest
from fedfms.training.metrics import HONEST_RULE, reference_rule, reference_space
from fedfms.run_record import best_model_note

CARD_FORMAT = "fedfms-model-card"
CARD_VERSION = 1
CARD_MD, CARD_JSON = "model_card.md", "model_card.json"
SCORE_KEYS = ("dice", "iou", "volume_dice", "volume_iou", "dice_reference", "iou_reference", "num_samples")
SCORE_LABELS = {"dice": "Dice", "iou": "IoU", "volume_dice": "3D Dice", "volume_iou": "3D IoU",
                "dice_reference": "ref Dice", "iou_reference": "ref IoU", "num_samples": "n"}
# cross_val_results.json's names of the server's models (fedfms.reporting.run_report), and the card's
MODEL_NAMES = {"SRV_FL_global_model.pt": "global_final", "SRV_best_FL_global_model.pt": "global_best"}
PRIVACY_FILTERS = {"nvflare.app_common.filters.percentile_privacy.PercentilePrivacy": "percentile",
                   "nvflare.app_common.filters.svt_privacy.SVTPrivacy": "svt"}
HE_ENCRYPTOR = "nvflare.app_opt.he.model_encryptor.HEModelEncryptor"
QUANTIZER = "nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer"
VERSIONED = ("fedfms", "nvflare", "torch", "monai", "segment-anything", "numpy")


def model_card(run: str | Path, job: str | Path | None = None, data_root: str | Path | None = None,
               exported: dict | None = None) -> dict:
    """The card of the run in ``run`` (any folder ``fedfms report`` takes) as a JSON-able dict.

    ``job``: the job folder the run used (default: the configs deployed in the run's workspace); ``data_root``: the
    sites' prepared folders (one per site), for the manifests' counts and preset; ``exported``: what a bundle export
    adds (which model, its file and digest)."""
    run_dir = find_run_dir(run)
    record = read_run_record(run_dir / RUN_RECORD) if (run_dir / RUN_RECORD).is_file() else None
    cross = read_cross_site(run_dir)
    client, server, meta = job_configs(run_dir, job)
    executor = _executor_args(client)
    model, train = dict(executor.get("model_config") or {}), dict(executor.get("train_config") or {})
    sites_in_run = sorted(set(cross) | set((record or {}).get("expected_sites") or []) | set(site_summary(record or {})))
    card = {
        "format": CARD_FORMAT, "version": CARD_VERSION, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run": _run_part(run_dir, record, summarize),
        "job": _job_part(meta, model, train, server, record),
        "versions": _versions(),
        "sites": _sites_part(sites_in_run, record, site_summary, data_root),
        "contributions": _contributions(record),
        "scores": _scores_part(cross, model),
        "heldout": _heldout(run_dir),
        "privacy": _privacy_part(client, server, executor, model),
        "limits": _limits(record, cross, sites_in_run, run_dir, summarize),
    }
    if exported:
        card["exported"] = exported
    return card


# ----------------------------------------------------------------------------------------------------------------
# reading the run


def job_configs(run_dir: Path, job: str | Path | None = None) -> tuple[dict, dict, dict]:
    """(config_fed_client.json, config_fed_server.json, meta.json) of the job the run ran: from ``job`` when given,
    else the configs deployed in the server's run folder (and its simulator workspace)."""
    if job is not None:
        roots, where = [Path(job)], f"{job}"
    else:
        roots, where = [run_dir, Path(run_dir).parent.parent], f"{run_dir} (pass --job with the job folder)"
    found = {}
    for name in ("config_fed_client.json", "config_fed_server.json"):
        for root in roots:
            paths = sorted(root.rglob(name), key=lambda p: (len(p.parts), str(p))) if root.is_dir() else []
            if paths:
                found[name] = _read_json(paths[0])
                break
    if "config_fed_client.json" not in found:
        raise DataError(f"{where}: no config_fed_client.json; expected the job's deployed configs")
    meta = (Path(job) if job is not None else Path(run_dir)) / "meta.json"
    return (found["config_fed_client.json"], found.get("config_fed_server.json", {}),
            _read_json(meta) if meta.is_file() else {})


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds {type(data).__name__}; expected a JSON object")
    return data


def _executor_args(client: dict) -> dict:
    try:
        return dict(client["executors"][0]["executor"]["args"])
    except (KeyError, IndexError, TypeError):
        raise DataError("config_fed_client.json: no executors[0].executor.args; expected a FedFMS job's client config") from None


def components(config) -> list[tuple[str, dict]]:
    """(class path, args) of every component a job config names, nested ones included."""
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


def _server_component(server: dict, component_id: str) -> tuple[str | None, dict]:
    for comp in server.get("components", []) + server.get("workflows", []):
        if comp.get("id") == component_id:
            return comp.get("path") or comp.get("name"), dict(comp.get("args") or {})
    return None, {}


# ----------------------------------------------------------------------------------------------------------------
# the card's parts


def _run_part(run_dir: Path, record: dict | None, summarize) -> dict:
    done = [r for r in (record or {}).get("rounds", []) if r.get("seconds") is not None]
    return {"folder": str(run_dir), "job_id": (record or {}).get("job_id"),
            "status": (record or {}).get("status", "no run record"), "reason": (record or {}).get("reason"),
            "summary": summarize(record) if record else None, "ended": (record or {}).get("ended"),
            "rounds_finished": len(done),
            "rounds_planned": (record["last_round"] + 1) if record and record.get("last_round") is not None else None,
            "start_round": (record or {}).get("start_round"),
            "best": (record or {}).get("best")}


def _job_part(meta: dict, model: dict, train: dict, server: dict, record: dict | None) -> dict:
    recipe = meta.get("fedfms_recipe") or {}
    _, sag = _server_component(server, "scatter_and_gather")
    aggregator, agg_args = _server_component(server, "aggregator")
    return {
        "name": meta.get("name"), "variant": recipe.get("variant"), "settings": recipe.get("settings"),
        "model": model.get("variant"), "mode": model.get("mode"), "pretrained": model.get("pretrained"),
        "flavour": flavour_of(model, train), "model_config": model, "train_config": train,
        "num_rounds": sag.get("num_rounds"), "min_sites": (record or {}).get("min_sites"),
        "on_missing_site": (record or {}).get("on_missing_site"), "expected_sites": (record or {}).get("expected_sites"),
        "aggregator": {"class": aggregator, "args": agg_args} if aggregator else None,
    }


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return {"note": "installed where the card was written", **found}


def _sites_part(sites: list[str], record: dict | None, site_summary, data_root) -> dict:
    summary = site_summary(record) if record else {}
    out = {}
    for site in sites:
        info = summary.get(site, {})
        entry = {"train_samples": info.get("samples"), "contributed": info.get("contributed", []),
                 "missed": info.get("missed", {}), "manifest": None}
        if data_root is not None:
            entry["manifest"] = _manifest(Path(data_root) / site)
        out[site] = entry
    return out


def _manifest(folder: Path) -> dict:
    m = read_manifest(folder)  # DataError naming the file when the site's folder is not a prepared site
    return {"dataset": m.dataset, "preset": m.settings.get("preset"), "samples": len(m.samples),
            "volumes": len(set(m.volumes)), "classes": list(m.classes), "image_size": m.image_size,
            "mask_size": m.mask_size, "two_and_half_d": m.settings.get("two_and_half_d"),
            "positive_fraction": m.counts.get("positive_fraction")}


def _contributions(record: dict | None) -> list[dict]:
    keep = ("round", "status", "accepted", "failed", "missing", "late", "updated_model", "seconds")
    return [{k: r.get(k) for k in keep} for r in sorted((record or {}).get("rounds", []), key=lambda r: r.get("round", 0))]


def _scores_part(cross: dict, model: dict) -> dict:
    models: dict[str, dict] = {}
    for site, by_model in sorted(cross.items()):
        for name, metrics in (by_model or {}).items():
            label = MODEL_NAMES.get(name, f"site_model:{name}")
            models.setdefault(label, {})[site] = {k: (metrics or {}).get(k) for k in SCORE_KEYS}
    order = lambda label: (list(MODEL_NAMES.values()).index(label) if label in MODEL_NAMES.values() else 9, label)
    models = {label: models[label] for label in sorted(models, key=order)}
    average = {label: {k: finite_mean([row.get(k) for row in rows.values()]) for k in SCORE_KEYS if k != "num_samples"}
               for label, rows in models.items()}
    return {
        "rules": {"project": HONEST_RULE + "; 3D Dice/IoU from voxel counts summed per volume",
                  "reference": reference_rule(reference_space(model.get("variant", "")))},
        "where": "each site's validation split (FLARE's cross-site evaluation at the end of the run)",
        "models": models,
        "average": average,
        "model_names": {"global_final": "the final global model (FL_global_model.pt)",
                        "global_best": "the best global model FLARE's selector kept (best_FL_global_model.pt)",
                        "site_model:<name>": "a model a site submitted for FLARE's cross-site evaluation: its own "
                                             "local model after the last round (or a personalised model, where the "
                                             "job keeps one)"},
    }


def _heldout(run_dir: Path) -> dict | None:
    """A leave-one-site-out fold's held-out scores (``<fold>/fold.json``, a few folders above the run folder)."""
    for folder in list(Path(run_dir).parents)[:4]:
        path = folder / "fold.json"
        if path.is_file():
            fold = _read_json(path)
            results = fold.get("results") or {}
            return {"site": fold.get("holdout"), "train_sites": fold.get("train_sites"), "status": fold.get("status"),
                    "models": {name: {k: (results.get(name) or {}).get(k) for k in SCORE_KEYS}
                               for name in ("federated", "federated_best") if name in results}}
    return None


def _privacy_part(client: dict, server: dict, executor: dict, model: dict) -> dict:
    site_filters = components(client.get("task_result_filters", []))
    dp = [(PRIVACY_FILTERS[p], a) for p, a in site_filters if p in PRIVACY_FILTERS]
    he = [a for p, a in site_filters if p == HE_ENCRYPTOR]
    quant = [a for p, a in site_filters if p == QUANTIZER]
    check = next((a for p, a in components(server.get("task_result_filters", [])) if p.endswith("ContributionCheckFilter")), {})
    mode = model.get("mode")
    travel = {"fedmsa": "adapters + mask decoder + head (the frozen encoder never leaves a site)",
              "fedsam": "every weight of the model"}.get(mode, "every weight of the model")
    return {
        "update": executor.get("update", "weights"),
        "dp_filter": {"name": dp[0][0], "args": dp[0][1]} if dp else None,
        "he": {"encryption": "CKKS (FLARE's TenSEAL filters)", "args": he[0]} if he else None,
        "transfer": (quant[0].get("quantization_type") if quant else "float32"),
        "travel_set": travel,
        "max_samples": check.get("max_samples"), "pinned_site_samples": check.get("site_samples"),
        "data_in_bundle": "none: the weights of the model and this card only",
    }


def _limits(record: dict | None, cross: dict, sites: list[str], run_dir: Path, summarize) -> list[str]:
    lines = []
    if record is None:
        lines.append("no run record (fedfms_run.json): contributions and missed rounds are unknown")
    else:
        first, *per_site = summarize(record).splitlines()
        lines += ([first] if record.get("status") != "completed" else []) + [line.strip() for line in per_site]
        for r in record.get("rounds", []):
            if r.get("seconds") is not None and not r.get("updated_model"):
                lines.append(f"round {r['round']}: the global model was not updated ({r.get('status')})")
    if not cross:
        lines.append("no cross-site evaluation (cross_val_results.json): the run stopped before it; no scores")
    else:
        unscored = [s for s in sites if s not in cross]
        if unscored:
            lines.append(f"no cross-site scores for {', '.join(unscored)}")
    lines += best_model_note(run_dir)
    return lines


# ----------------------------------------------------------------------------------------------------------------
# writing


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_card(card: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``out_dir/model_card.md`` and ``model_card.json`` (the folder made if missing)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: is a file; expected a folder for the model card")
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / CARD_MD, out_dir / CARD_JSON
    js.write_text(json.dumps(card, indent=2, default=str) + "\n")
    md.write_text(card_markdown(card))
    return md, js


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt_score(v)
    return str(v)


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def card_markdown(card: dict) -> str:
    job, run, priv = card["job"], card["run"], card["privacy"]
    title = f"{job.get('variant') or job.get('name') or 'FedFMS'} ({job.get('model')}, {job.get('mode')})"
    out = [f"# Model card: {title}", ""]
    exported = card.get("exported")
    if exported:
        out += ["## This model", "", f"- model: **{exported.get('model')}**, from `{exported.get('source')}`",
                f"- weights: `{exported.get('file')}`, sha256 `{exported.get('sha256')}` ({exported.get('tensors')} tensors; "
                f"{exported.get('what')})"]
        if exported.get("frozen_encoder"):
            out.append(f"- frozen encoder (not in the bundle): {exported['frozen_encoder']}")
        out.append("")
    out += ["## The federation", "",
            f"- run: `{run['folder']}`; status **{run['status']}**, {run['rounds_finished']} of "
            f"{run.get('rounds_planned') or '?'} round(s) finished" + (f"; {run['reason']}" if run.get("reason") else ""),
            f"- job: variant `{job.get('variant')}`, flavour `{job.get('flavour')}`, {job.get('num_rounds')} round(s) in this "
            f"job, sites {', '.join(job.get('expected_sites') or []) or '-'} (min {job.get('min_sites')} per round, "
            f"on a missing site: {job.get('on_missing_site')})",
            f"- model: `{job.get('model')}` {job.get('mode')}, pretrained {job.get('pretrained')}",
            f"- aggregation: `{(job.get('aggregator') or {}).get('class')}` {json.dumps((job.get('aggregator') or {}).get('args'))}",
            f"- training (per site and round): `{json.dumps(job.get('train_config'))}`",
            f"- recipe settings: `{json.dumps(job.get('settings'))}`", ""]
    out += ["## Sites", ""]
    rows = []
    for site, s in card["sites"].items():
        m = s.get("manifest") or {}
        rows.append([site, m.get("dataset"), m.get("preset"), m.get("samples"), m.get("volumes"), s.get("train_samples"),
                     ",".join(map(str, s.get("contributed") or [])) or "none",
                     ",".join(sorted(s.get("missed") or {}, key=int)) or "-"])
    out += [_md_table(["site", "dataset", "preset", "samples (manifest)", "volumes", "FedAvg weight (train samples)",
                       "rounds contributed", "rounds missed"], rows), ""]
    if not any(s.get("manifest") for s in card["sites"].values()):
        out += ["(manifest columns: pass --data-root with the sites' prepared folders)", ""]
    out += ["## Contributions per round", ""]
    rows = [[r["round"], r.get("status"), ", ".join(f"{k} ({v})" for k, v in sorted((r.get("accepted") or {}).items())) or "none",
             ", ".join(sorted(set(r.get("missing") or []) | set(r.get("failed") or {}))) or "-", r.get("updated_model"),
             r.get("seconds")] for r in card["contributions"]]
    out += [_md_table(["round", "status", "accepted (samples)", "missing / failed", "model updated", "seconds"], rows), ""]
    scores = card["scores"]
    out += ["## Scores", "", f"Where: {scores['where']}.", "",
            f"- project rule (Dice, IoU, 3D): {scores['rules']['project']}",
            f"- paper-reference rule (ref Dice, ref IoU): {scores['rules']['reference']}", ""]
    for label, by_site in scores["models"].items():
        out += [f"### {label}", ""]
        rows = [[site, *(row.get(k) for k in SCORE_KEYS)] for site, row in by_site.items()]
        rows.append(["average", *(scores["average"][label].get(k) for k in SCORE_KEYS if k != "num_samples"), None])
        out += [_md_table(["site", *(SCORE_LABELS[k] for k in SCORE_KEYS)], rows), ""]
    held = card.get("heldout")
    if held:
        out += ["## Held-out site (leave-one-site-out)", "",
                f"`{held['site']}` took no part in training (trained on {', '.join(held.get('train_sites') or [])}):", ""]
        out += [_md_table(["model", *(SCORE_LABELS[k] for k in SCORE_KEYS)],
                          [[name, *(row.get(k) for k in SCORE_KEYS)] for name, row in held["models"].items()]), ""]
    dp = priv.get("dp_filter")
    out += ["## Privacy", "",
            f"- what leaves a site: {priv['travel_set']}; sent as {priv['update']} in {priv['transfer']}",
            "- differential privacy: " + (f"FLARE's `{dp['name']}` filter, {json.dumps(dp['args'])}" if dp else "none"),
            "- homomorphic encryption: " + (f"{priv['he']['encryption']} {json.dumps(priv['he']['args'])}" if priv.get("he") else "none"),
            f"- server checks: sample counts at most {priv.get('max_samples')}"
            + (f", pinned counts {json.dumps(priv['pinned_site_samples'])}" if priv.get("pinned_site_samples") else ""),
            f"- site data in this card or bundle: {priv['data_in_bundle']}", ""]
    out += ["## Limits", ""] + [f"- {line}" for line in card["limits"] or ["none recorded"]] + [""]
    versions = card["versions"]
    out += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "note") + f" ({versions['note']})", ""]
    return "\n".join(out)
