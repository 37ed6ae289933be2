"""The centralised baseline: the same model trained on the pooled data of the training sites.

This is the paper's 'SAM'/'MSA' row next to FedSAM/FedMSA. Pooling goes through ``LocalTrainer``, which
splits every site by patient with the same ``val_fraction``/``split_seed`` as the federation does, so the
centralised model trains on exactly the union of the samples the federated sites train on, and selects
its epoch on the union of their validation samples.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence


from fedfms.errors import ConfigError
from fedfms.evaluation.scoring import is_nnunet_model, nnunet_model_dict, resolve_model_config
from fedfms.models import ModelConfig
from fedfms.numbers import finite_or_none
from fedfms.progress import bar, drawn
from fedfms.training.trainer import LocalTrainer, TrainConfig
from fedfms.training.weights_files import history_path, last_weights_path, save_weights
from fedfms.nnunet.evaluate import train_centralized as train_nnunet

SELECTION = "highest slice Dice (mean over classes) on the pooled validation split, earliest epoch on ties"


def train_centralized(
    model_cfg: ModelConfig | Mapping,
    train_cfg: TrainConfig | Mapping,
    site_dirs: Sequence[str | os.PathLike],
    epochs: int,
    out_weights: str | os.PathLike,
    overwrite: bool = False,
    checkpoint: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train on the pooled ``site_dirs`` for ``epochs`` epochs; save the travel set of the selected epoch
    (:data:`SELECTION`) to ``out_weights``, the last epoch's to :func:`last_weights_path` and the per-epoch
    loss / validation Dice with the selected epoch to :func:`history_path`. Returns ``out_weights``.

    Without any validation sample (or when no validation slice can be scored) the last epoch is kept,
    and the history says so."""
    if is_nnunet_model(model_cfg):
        # nnU-Net on the pooled sites, planned as the federation would be; the same outputs plus its plan

        return train_nnunet(nnunet_model_dict(model_cfg), train_cfg, site_dirs,
                            epochs, out_weights, overwrite=overwrite, checkpoint=checkpoint, log=log)
    if epochs < 1:
        raise ConfigError(f"epochs is {epochs}; expected >= 1")
    if not site_dirs:
        raise ConfigError("no training site folders given")
    out = Path(out_weights)
    targets = (out, last_weights_path(out), history_path(out))
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]}: already exists; pass --overwrite to replace it")
    cfg = resolve_model_config(model_cfg, checkpoint)
    tcfg = train_cfg if isinstance(train_cfg, TrainConfig) else TrainConfig.from_dict(dict(train_cfg))
    trainer = LocalTrainer(cfg, tcfg, [str(d) for d in site_dirs])
    has_val = len(trainer.datasets["val"]) > 0
    out.parent.mkdir(parents=True, exist_ok=True)

    history, best_epoch, best_score, best_weights = [], None, -math.inf, None
    start = time.perf_counter()
    # on a terminal one bar replaces the per-epoch lines; in a log, a line every tenth of the run
    epochs_bar = bar(total=epochs, desc="centralized", unit="epoch")
    every = max(1, epochs // 10)
    for epoch in range(1, epochs + 1):
        fit = trainer.fit(epochs=1)
        val = trainer.evaluate("val") if has_val else {}
        score = finite_or_none(val.get("dice"))
        history.append({"epoch": epoch, "loss": fit["loss"], "steps": fit["steps"], "val_dice": score,
                        "val_iou": finite_or_none(val.get("iou")), "val_volume_dice": finite_or_none(val.get("volume_dice"))})
        if score is not None and score > best_score:
            best_epoch, best_score = epoch, score
            # a copy on the CPU: the trainer's tensors keep changing in the next epochs
            best_weights = {k: v.detach().to("cpu", copy=True) for k, v in trainer.travel_weights().items()}
        shown = "-" if score is None else f"{score:.3f}"
        epochs_bar.set_postfix_str(f"loss {fit['loss']:.4f}, val Dice {shown}, best epoch {best_epoch or '-'}", refresh=False)
        epochs_bar.update()
        if log and not drawn(epochs_bar) and (epoch % every == 0 or epoch == epochs):
            log(f"  centralized epoch {epoch}/{epochs}: loss {fit['loss']:.4f}, pooled val Dice {shown}")
    epochs_bar.close()

    last = {k: v.detach().cpu() for k, v in trainer.travel_weights().items()}
    if best_weights is None:
        best_epoch, best_weights = epochs, last
        selection = "last epoch (no scorable validation sample)"
    else:
        selection = SELECTION
    save_weights(best_weights, out)
    save_weights(last, last_weights_path(out))
    summary = {
        "sites": [str(d) for d in site_dirs],
        "pooled": trainer.site,
        "train_samples": trainer.num_train_samples,
        "val_samples": len(trainer.datasets["val"]),
        "epochs": epochs,
        "selected_epoch": best_epoch,
        "selection": selection,
        "seconds": time.perf_counter() - start,
        "model_config": cfg.to_dict(),
        "train_config": tcfg.to_dict(),
        "history": history,
    }
    history_path(out).write_text(json.dumps(summary, indent=2) + "\n")
    return out
