"""Held-out scoring and the centralised baseline for FednnU-Net, with the signatures of
``fedfms.evaluation.scoring.evaluate_sites`` and ``fedfms.evaluation.centralized.train_centralized`` so the LOSO
protocol can call them for the ``nnunet`` variant.

A saved nnU-Net model is its weights plus its plan: the federation's planning step writes the plan as
:data:`PLAN_FILE` beside the server's ``FL_global_model.pt``; the centralised baseline writes it beside its
``model.pt``. :func:`find_plan` looks for it there.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from fedfms.errors import CheckpointError, ConfigError
from fedfms.nnunet.config import NnUNetConfig, PlanError, check_model_config
from fedfms.nnunet.fingerprint import merge_fingerprints, site_fingerprint
from fedfms.nnunet.plan import build_network, check_plan, make_plan, travel_state
from fedfms.nnunet.sitedata import NnUNetSiteData
# the same output files as the project's centralised baseline (one home for their names and layout)
from fedfms.training.weights_files import history_path, last_weights_path, save_weights
from fedfms.training.predict import load_weights
from fedfms.nnunet.inference import NnUNetInference
from fedfms.training.trainer import pick_device
from fedfms.nnunet.trainer import NnUNetSiteTrainer

PLAN_FILE = "nnunet_plan.json"
SELECTION = "highest slice Dice (mean over classes) on the pooled validation split, earliest epoch on ties"


def write_plan(plan: Mapping, folder: str | os.PathLike) -> Path:
    path = Path(folder) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_plan(path: str | os.PathLike) -> dict:
    try:
        return check_plan(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise PlanError(f"{path}: no nnU-Net plan there") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: not valid JSON ({exc})") from None
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None


def find_plan(weights_path: str | os.PathLike, levels: int = 2) -> dict:
    """The plan saved with a model: ``nnunet_plan.json`` in the weights' folder or up to ``levels`` above."""
    folder = Path(weights_path).resolve().parent
    for candidate in [folder, *list(folder.parents)[:levels]]:
        if (candidate / PLAN_FILE).is_file():
            return read_plan(candidate / PLAN_FILE)
    raise PlanError(f"{weights_path}: no {PLAN_FILE} beside it; an nnU-Net model is rebuilt from the plan it was trained "
                    "with (the federation writes it next to FL_global_model.pt)")


def load_network(plan: Mapping, weights_path: str | os.PathLike) -> torch.nn.Module:
    """The planned network with the saved weights (every key and shape checked)."""
    network = build_network(plan, deep_supervision=False)
    weights = load_weights(weights_path)
    state = travel_state(network)
    missing, unexpected = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path}: does not match the planned nnU-Net network: {len(missing)} missing key(s) "
                              f"{missing[:1]}, {len(unexpected)} unexpected key(s) {unexpected[:1]}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise CheckpointError(f"{weights_path}: tensor '{key}' has shape {tuple(value.shape)}; the plan's network "
                                  f"has {tuple(state[key].shape)}")
    network.load_state_dict(weights, strict=False)  # every tensor once; the decoder's aliases load with them
    return network.eval()


def evaluate_sites(model_cfg: Mapping, weights_path: str | os.PathLike, site_dirs: Sequence[str | os.PathLike],
                   batch_size: int = 6, device: str = "auto", amp: str = "auto", checkpoint: str | None = None,
                   plan: Mapping | None = None, mirror_tta: bool = True) -> list[dict]:
    """``fedfms.evaluation.scoring.evaluate_sites`` for an nnU-Net model: one row per site, every sample of
    it scored (both rules, per class, 3D). ``plan``: default :func:`find_plan` beside ``weights_path``.
    ``batch_size``, ``amp``, ``checkpoint``: accepted for the common signature (nnU-Net predicts case by case
    with its own autocast rule; there is no checkpoint)."""
    if not site_dirs:
        raise ConfigError("no site folders to evaluate")
    model_cfg = check_model_config(model_cfg)
    plan = check_plan(dict(plan)) if plan is not None else find_plan(weights_path)
    if model_cfg.get("num_classes", 1) != len(plan["classes"]):
        raise ConfigError(f"{weights_path}: the plan has {len(plan['classes'])} class(es) {plan['classes']}; the model "
                          f"config says num_classes={model_cfg.get('num_classes')}")
    dev = pick_device(device)
    network = load_network(plan, weights_path).to(dev)
    inference = NnUNetInference(plan, network, dev, mirror=mirror_tta)
    rows = []
    for d in site_dirs:
        data = NnUNetSiteData(d, val_fraction=0.0)
        if data.classes != plan["classes"]:
            raise ConfigError(f"{d}: the site has classes {data.classes}; the model predicts {plan['classes']}")
        rows.append({"site": data.site, "site_dir": str(Path(d)), **inference.score(data, data.splits["all"])})
    return rows


def train_centralized(model_cfg: Mapping, train_cfg: NnUNetConfig | Mapping, site_dirs: Sequence[str | os.PathLike],
                      epochs: int, out_weights: str | os.PathLike, overwrite: bool = False, checkpoint: str | None = None,
                      log: Callable[[str], None] | None = None) -> Path:
    """nnU-Net trained on the pooled ``site_dirs`` for ``epochs`` nnU-Net epochs (the federation's rounds x local
    epochs), planned from the same fingerprints the federation would merge: ``fedfms.evaluation.centralized.
    train_centralized``'s outputs (``model.pt`` of the best validation epoch, ``model_last.pt``, ``model.json``)
    plus the plan (:data:`PLAN_FILE`) beside them."""
    if epochs < 1:
        raise ConfigError(f"epochs is {epochs}; expected >= 1")
    if not site_dirs:
        raise ConfigError("no training site folders given")
    out = Path(out_weights)
    targets = (out, last_weights_path(out), history_path(out), out.parent / PLAN_FILE)
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]}: already exists; pass --overwrite to replace it")
    check_model_config(model_cfg)
    cfg = train_cfg if isinstance(train_cfg, NnUNetConfig) else NnUNetConfig.from_dict(dict(train_cfg))
    cfg = NnUNetConfig.from_dict({**cfg.to_dict(), "total_epochs": epochs})
    # the pooled cases' fingerprint is the sum of the sites' (counts add up): the federation's plan
    pooled = NnUNetSiteData([str(d) for d in site_dirs], cfg.val_fraction, cfg.split_seed)
    plan = make_plan(merge_fingerprints({pooled.site: site_fingerprint(pooled)}), cfg)
    trainer = NnUNetSiteTrainer(plan, cfg, pooled)
    has_val = bool(trainer.datasets["val"])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_plan(plan, out.parent)
    history, best_epoch, best_score, best_weights = [], None, -math.inf, None
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        fit = trainer.fit(epochs=1)
        val = trainer.evaluate("val") if has_val else {}
        score = val.get("dice")
        score = float(score) if isinstance(score, float) and math.isfinite(score) else None
        history.append({"epoch": epoch, "loss": fit["loss"], "steps": fit["steps"], "lr": fit["lr"][0], "val_dice": score})
        if score is not None and score > best_score:
            best_epoch, best_score, best_weights = epoch, score, trainer.travel_weights()
        if log:
            log(f"  centralized nnU-Net epoch {epoch}/{epochs}: loss {fit['loss']:.4f}, pooled val Dice "
                f"{'-' if score is None else f'{score:.3f}'}")
    last = trainer.travel_weights()
    selection = SELECTION
    if best_weights is None:
        best_epoch, best_weights, selection = epochs, last, "last epoch (no scorable validation sample)"
    save_weights(best_weights, out)
    save_weights(last, last_weights_path(out))
    history_path(out).write_text(json.dumps({
        "sites": [str(d) for d in site_dirs], "pooled": trainer.site, "train_samples": trainer.num_train_samples,
        "val_samples": len(trainer.datasets["val"]), "epochs": epochs, "selected_epoch": best_epoch,
        "selection": selection, "seconds": time.perf_counter() - start, "model_config": dict(model_cfg),
        "train_config": cfg.to_dict(), "plan_file": str(out.parent / PLAN_FILE), "history": history}, indent=2) + "\n")
    return out
