"""Per-site Dice/IoU tables and figures from a finished FLARE run (simulator, POC or production).

Inputs are FLARE's own outputs: ``cross_site_val/cross_val_results.json`` (CrossSiteModelEval) and the
TensorBoard events the server wrote from the sites' streamed metrics (``tb_events/<site>/``), plus the run
record of the server's federation monitor (``fedfms_run.json``: which site contributed to which round).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedfms.errors import DataError
from fedfms.run_record import RUN_RECORD, read_run_record

GLOBAL_MODEL = "SRV_FL_global_model.pt"
BEST_MODEL = "SRV_best_FL_global_model.pt"


def find_run_dir(path: str | Path) -> Path:
    """The server's run folder (holding ``cross_site_val/`` or the run record): given itself, a simulator
    workspace, or a downloaded job result (the shallowest match wins)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder; expected a finished FLARE run (simulator workspace or downloaded result)")
    found = [p.parent.parent for p in path.rglob("cross_site_val/cross_val_results.json")]
    found += [p.parent for p in path.rglob(RUN_RECORD)]
    if not found:
        raise DataError(f"{path}: no cross_site_val/cross_val_results.json or {RUN_RECORD} found; "
                        "expected a FLARE run folder")
    return sorted(found, key=lambda p: (len(p.parts), str(p)))[0]


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
        rows.append({"site": "average", **{k: _mean([r[k] for r in rows]) for k in rows[0] if k not in ("site", "rounds")}})
    return rows


def _mean(values):
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


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
    table = [[title for _, title in cols]] + [[cell(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_report(run_dir: str | Path, out_png: str | Path, title: str = "FedFMS") -> Path:
    """Bars of per-site Dice/IoU (final global model) and learning curves (val Dice, train loss per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = find_run_dir(run_dir)
    rows = [r for r in site_table(run_dir) if r["site"] != "average"]
    curves = read_curves(run_dir)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
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
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
