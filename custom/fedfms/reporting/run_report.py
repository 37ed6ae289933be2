"""Per-site Dice/IoU tables and figures from a finished FLARE run (simulator, POC or production).

Inputs are FLARE's own outputs: ``cross_site_val/cross_val_results.json`` (CrossSiteModelEval) and the
TensorBoard events the server wrote from the sites' streamed metrics (``tb_events/<site>/``), plus the run
record of the server's federation monitor (``fedfms_run.json``: which site contributed to which round).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedfms.errors import DataError
from fedfms.numbers import finite_mean, render_table
from fedfms.run_record import RUN_RECORD, find_run_dir, read_run_record
from fedfms.overlays import LEGEND, dice, overlay
from fedfms.evaluation.baselines import model_predictor, site_split
from fedfms.evaluation.personal import read_personal_record
from fedfms.evaluation.scoring import resolve_model_config
from fedfms.models import ModelConfig
from fedfms.training.predict import load_model
from fedfms.training.trainer import TrainConfig

GLOBAL_MODEL = "SRV_FL_global_model.pt"
BEST_MODEL = "SRV_best_FL_global_model.pt"


def read_cross_site(run_dir: Path) -> dict:
    path = run_dir / "cross_site_val" / "cross_val_results.json"
    if not path.is_file():
        return {}  # a run that stopped before cross-site evaluation
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def read_curves(run_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """site -> tag -> [(round, value)] from the server's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict = {}
    tb_root = run_dir / "tb_events"
    if not tb_root.is_dir():
        return curves
    for site_dir in sorted(p for p in tb_root.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(site_dir))
        acc.Reload()
        curves[site_dir.name] = {
            tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])
        }
    return curves


def _curve(curves: dict, site: str, suffix: str) -> list[tuple[int, float]]:
    for tag, points in curves.get(site, {}).items():
        if tag.endswith(suffix):
            return points
    return []


def site_table(run_dir: str | Path) -> list[dict]:
    """One row per site: Dice/IoU of the final and the best global model, Dice at round 0, and the rounds the
    site's update was averaged into ("2/2"; a site that never contributed is flagged)."""
    run_dir = find_run_dir(run_dir)
    cross = read_cross_site(run_dir)
    curves = read_curves(run_dir)
    record = read_run_record(run_dir / RUN_RECORD) if (run_dir / RUN_RECORD).is_file() else None
    contributions = (record or {}).get("sites", {})
    finished = len([r for r in (record or {}).get("rounds", []) if r.get("seconds") is not None])
    rows = []
    for site in sorted(set(cross) | set(contributions)):
        final = cross.get(site, {}).get(GLOBAL_MODEL, {})
        best = cross.get(site, {}).get(BEST_MODEL, {})
        start = _curve(curves, site, "val_dice")
        row = {
            "site": site,
            "dice_round0": start[0][1] if start and start[0][0] == 0 else None,
            "dice": final.get("dice"),
            "iou": final.get("iou"),
            "volume_dice": final.get("volume_dice"),
            "dice_reference": final.get("dice_reference"),
            "best_dice": best.get("dice"),
            "best_iou": best.get("iou"),
            "num_samples": final.get("num_samples"),
        }
        if record is not None:
            done = len(contributions.get(site, {}).get("contributed", []))
            row["rounds"] = f"{done}/{finished}" + (" never contributed" if done == 0 else "")
        rows.append(row)
    if rows:
        rows.append({"site": "average", **{k: finite_mean([r[k] for r in rows]) for k in rows[0] if k not in ("site", "rounds")}})
    return rows


SCORING_NOTE = ("Dice/IoU: per slice at sigmoid > 0.5, slices empty in both ground truth and prediction left out; "
                "3D Dice over each volume; 'paper rule': the FedFMS code's (empty/empty scores 1, 5 thresholds "
                "averaged) - see docs/evaluation.md")


def format_table(rows: list[dict]) -> str:
    cols = [("site", "site"), ("dice_round0", "Dice r0"), ("dice", "Dice"), ("iou", "IoU"),
            ("volume_dice", "3D Dice"), ("dice_reference", "Dice (paper rule)"), ("best_dice", "best Dice"),
            ("best_iou", "best IoU"), ("num_samples", "n")]
    if any("rounds" in r for r in rows):
        cols.append(("rounds", "rounds averaged"))
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    return render_table([title for _, title in cols], [[cell(r.get(k)) for k, _ in cols] for r in rows])


# ----------------------------------------------------------------------------------------------------------------
# figures


def pick_samples(indices, k: int) -> list[int]:
    """``k`` evenly spaced entries of ``indices`` (all of them when there are fewer): which validation samples a
    figure shows, the same every time."""
    indices = list(indices)
    if len(indices) <= k:
        return indices
    step = (len(indices) - 1) / (k - 1) if k > 1 else 0
    return [indices[int(round(j * step))] for j in range(k)]


def predicted_masks(predict, images) -> list:
    """Binary masks (sigmoid > 0.5, first class) of a predictor (images -> logits) for a list of (3, S, S) images."""
    import torch

    with torch.no_grad():
        logits = predict(torch.stack([torch.as_tensor(i) for i in images]))
    return [(torch.sigmoid(l[0].float()) > 0.5).numpy() for l in logits]


def site_pictures(dataset, indices, predictors: dict) -> list[dict]:
    """One entry per sample: its image, ground truth (first class) and each predictor's mask (label -> predictor)."""
    items = [dataset[i] for i in indices]
    images = [item["image"] for item in items]
    masks = {label: predicted_masks(predict, images) for label, predict in predictors.items()}
    return [{"id": item.get("id", str(i)), "image": item["image"].numpy(), "truth": item["mask"][0].numpy() > 0,
             "predictions": {label: masks[label][j] for label in predictors}}
            for j, (i, item) in enumerate(zip(indices, items))]


def run_pictures(run_dir: str | Path, data_root: str | Path, job: str | Path | None = None, checkpoint: str | None = None,
                 samples: int = 2, weights: str | Path | None = None) -> dict[str, list[dict]]:
    """Pictures of the run's final global model on ``samples`` validation samples of each site: the site's folder is
    ``data_root/<site>``, its validation split the one the run's sites made (the job's ``val_fraction`` and
    ``split_seed``, from ``job`` or the run's own client config). A personalised run adds each site's personalised
    model, and its "global model" at a site is the global model with that site's local part (the site's
    ``fedfms_personal/global_model.pt``, when this machine can read it; else the initial local part, and said so)."""
    run_dir = find_run_dir(run_dir)
    model_cfg, train_cfg = run_configs(run_dir, job)
    cfg = resolve_model_config(ModelConfig.from_dict(model_cfg, "the run's model config"), checkpoint)
    tcfg = TrainConfig.from_dict(train_cfg, "the run's train config")
    weights = Path(weights) if weights else global_model_file(run_dir)
    local = bool(cfg.local_parts)
    model = load_model(cfg, weights, initial_local=local)
    predict = model_predictor(model)
    personal = (read_personal_record(run_dir) or {}).get("sites") or {}
    record = read_run_record(run_dir / RUN_RECORD) if (run_dir / RUN_RECORD).is_file() else {}
    sites = sorted(set(read_cross_site(run_dir)) | set((record or {}).get("expected_sites") or []))
    pictures = {}
    for site in sites:
        folder = Path(data_root) / site
        if not (folder / "manifest.json").is_file():
            raise DataError(f"{folder}: no prepared site for {site}; expected --data-root to hold one folder per site of the run")
        files = {kind: Path(f) for kind, f in ((personal.get(site) or {}).get("files") or {}).items() if Path(f).is_file()}
        predictors = {"global model": predict}
        if local:
            predictors = ({"global model": model_predictor(load_model(cfg, files["global"]))} if "global" in files
                          else {"global model (initial local part)": predict})
        if "personal" in files:
            predictors["personalised"] = model_predictor(load_model(cfg, files["personal"]))
        dataset, _, val = site_split(folder, tcfg, model.image_size, model.mask_size)
        pictures[site] = site_pictures(dataset, pick_samples(val, samples), predictors)
    return pictures


def global_model_file(run_dir: Path) -> Path:
    found = sorted((p for p in Path(run_dir).rglob("FL_global_model.pt") if not p.name.startswith("best")),
                   key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise DataError(f"{run_dir}: no FL_global_model.pt; expected the server's run folder of a finished run")
    return found[0]


def run_configs(run_dir: Path, job: str | Path | None = None) -> tuple[dict, dict]:
    """(model_config, train_config) the run's sites trained with: from ``job`` (a job folder) when given, otherwise
    from a site's deployed client config in the run's workspace."""
    if job is not None:
        configs = sorted(Path(job).glob("app*/config/config_fed_client.json"))
        where = f"{job}"
    else:
        root = Path(run_dir).parent.parent  # a simulator workspace: <ws>/server/simulate_job
        configs = sorted(root.glob("*/simulate_job/app_*/config/config_fed_client.json")) + sorted(
            Path(run_dir).rglob("config_fed_client.json"))
        where = f"{run_dir} (pass --job with the job folder)"
    for path in configs:
        try:
            args = json.loads(path.read_text())["executors"][0]["executor"]["args"]
            return dict(args["model_config"]), dict(args.get("train_config") or {})
        except (OSError, KeyError, IndexError, json.JSONDecodeError):
            continue
    raise DataError(f"{where}: no readable config_fed_client.json with the sites' model and train config")


def _draw_pictures(fig, grid, pictures: dict[str, list[dict]]) -> None:
    """One row per site: for each sample, the image, the ground truth and each prediction (overlays)."""
    for row, (site, samples) in enumerate(pictures.items()):
        col = 0
        for s, sample in enumerate(samples):
            panels = [("image", overlay(sample["image"])),
                      ("ground truth", overlay(sample["image"], truth=sample["truth"], fill_truth=True))]
            for label, mask in sample["predictions"].items():
                d = dice(mask, sample["truth"])
                panels.append((f"{label}\nDice {'-' if d is None else f'{d:.2f}'}",
                               overlay(sample["image"], mask, sample["truth"])))
            for title, picture in panels:
                if col >= grid.ncols:
                    break
                ax = fig.add_subplot(grid[row, col])
                ax.imshow(picture)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(title, fontsize=7)
                if col == 0:
                    ax.set_ylabel(site, fontsize=9)
                col += 1
    fig.text(0.5, 0.005, f"validation samples; {LEGEND}", ha="center", fontsize=8)


def _picture_columns(pictures: dict | None) -> int:
    if not pictures:
        return 0
    return max(sum(2 + len(s["predictions"]) for s in samples) for samples in pictures.values())


def plot_report(run_dir: str | Path, out_png: str | Path, title: str = "FedFMS", pictures: dict | None = None) -> Path:
    """Bars of per-site Dice/IoU (final global model) and learning curves (val Dice, train loss per round); with
    ``pictures`` (:func:`run_pictures`), a row per site of validation samples: image, ground truth, prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = find_run_dir(run_dir)
    rows = [r for r in site_table(run_dir) if r["site"] != "average"]
    curves = read_curves(run_dir)
    ncols = max(3, _picture_columns(pictures))
    nrows = 1 + len(pictures or {})
    fig = plt.figure(figsize=(max(15, 1.9 * ncols), 4.2 + 2.0 * (nrows - 1)))
    outer = fig.add_gridspec(2 if pictures else 1, 1, height_ratios=[4.2, 2.0 * (nrows - 1)] if pictures else [1])
    top = outer[0].subgridspec(1, 3)
    axes = [fig.add_subplot(top[0, i]) for i in range(3)]
    names = [r["site"] for r in rows]
    xs = range(len(rows))
    axes[0].bar([x - 0.2 for x in xs], [r["dice"] or 0 for r in rows], width=0.4, label="Dice")
    axes[0].bar([x + 0.2 for x in xs], [r["iou"] or 0 for r in rows], width=0.4, label="IoU")
    if any(r["dice_round0"] is not None for r in rows):
        axes[0].scatter(list(xs), [r["dice_round0"] or 0 for r in rows], color="k", marker="_", s=400, label="Dice, round 0")
    axes[0].set_xticks(list(xs), names)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("final global model, per site")
    axes[0].legend(loc="lower right")
    for site in sorted(curves):
        dice = _curve(curves, site, "val_dice")
        loss = _curve(curves, site, "train_loss")
        if dice:
            axes[1].plot(*zip(*dice), marker=".", label=site)
        if loss:
            axes[2].plot(*zip(*loss), marker=".", label=site)
    axes[1].set(title="validation Dice of the global model", xlabel="round", ylim=(0, 1))
    axes[2].set(title="local training loss", xlabel="round")
    for ax in axes[1:]:
        ax.legend()
        ax.grid(alpha=0.3)
    return _finish_figure(fig, outer, ncols, pictures, title, out_png, dpi=110)


def plot_demo(out_png: str | Path, scores: dict, methods: list[tuple[str, str]], runs: dict[str, Path],
              pictures: dict[str, list[dict]], title: str = "FedFMS demo") -> Path:
    """The demo's figure: validation Dice of every method at every site (bars), the federated runs' validation Dice
    per round (mean over sites, and each site thin), FedMSA's local training loss; then a row per site of
    validation samples with each method's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(3, _picture_columns(pictures))
    fig = plt.figure(figsize=(max(16, 1.8 * ncols), 4.6 + 2.0 * len(pictures)))
    outer = fig.add_gridspec(2, 1, height_ratios=[4.6, 2.0 * max(1, len(pictures))])
    top = outer[0].subgridspec(1, 3, width_ratios=[1.5, 1, 1])
    ax_bar, ax_dice, ax_loss = (fig.add_subplot(top[0, i]) for i in range(3))
    shown = [(k, label) for k, label in methods if k in scores]
    sites = sorted({s for k, _ in shown for s in scores[k]})
    width = 0.8 / max(1, len(shown))
    for j, (key, label) in enumerate(shown):
        values = [scores[key].get(s, {}).get("dice") or 0 for s in sites]
        ax_bar.bar([i - 0.4 + width * (j + 0.5) for i in range(len(sites))], values, width=width, label=label)
    ax_bar.set_xticks(range(len(sites)), sites)
    ax_bar.set(ylim=(0, 1), title="validation Dice per site (same slices for every method)")
    ax_bar.legend(fontsize=7, loc="lower right")
    ax_bar.grid(axis="y", alpha=0.3)
    for key, label in shown:
        if key not in runs:
            continue
        curves = read_curves(runs[key])
        per_site = {s: dict(_curve(curves, s, "val_dice")) for s in curves}
        rounds = sorted({r for c in per_site.values() for r in c})
        mean = [float(np.mean([c[r] for c in per_site.values() if r in c])) for r in rounds]
        line, = ax_dice.plot(rounds, mean, marker=".", label=label)
        for c in per_site.values():
            ax_dice.plot(sorted(c), [c[r] for r in sorted(c)], color=line.get_color(), alpha=0.25, lw=0.8)
        if key == "fedmsa":
            for s in sorted(curves):
                loss = _curve(curves, s, "train_loss")
                if loss:
                    ax_loss.plot(*zip(*loss), marker=".", label=s)
    ax_dice.set(title="federated runs: validation Dice of the global model\n(mean over sites; thin: each site)",
                xlabel="round", ylim=(0, 1))
    ax_loss.set(title="FedMSA (pretrained): local training loss", xlabel="round")
    for ax in (ax_dice, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _finish_figure(fig, outer, ncols, pictures, title, out_png, dpi=100)


def _finish_figure(fig, outer, ncols: int, pictures: dict | None, title: str, out_png: str | Path, dpi: int) -> Path:
    """The pictures row (if any), the title, and the PNG written (its folder made)."""
    import matplotlib.pyplot as plt

    if pictures:
        _draw_pictures(fig, outer[1].subgridspec(len(pictures), ncols), pictures)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png
