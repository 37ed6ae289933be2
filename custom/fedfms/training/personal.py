"""Personalised federation, FLARE-free: the job setting and what a site does once the federation is over.

One global model is the paper's design, but sites differ (scanner, stain, contrast) and a site should not end
up worse than on its own. A job's ``personalise`` setting (``fedfms job new --personalise norm,finetune:5``) is a
comma-separated list of:

- ``norm``: FedBN. Every normalisation layer that trains stays at its site: never sent, never averaged.
- ``head``: FedPer. The prompt-free class head (the U-Net's last convolution) stays at its site.
- ``decoder``: the whole mask decoder and its head stay at the site (FedMSA then shares only its adapters).
- ``finetune:N``: after the last round each site fine-tunes the final global model for N local epochs on its own
  training split, and keeps the global model too.
- ``alone``: for comparison, each site also trains the same model on its own data only, from the same start, for
  as many epochs as the federation ran (rounds x local epochs), and reports it beside the others.

The first three are the model's ``local_parts`` (:mod:`fedfms.models.travel`: what travels is the trained tensors
less the local part). After the last round, each site receives the final global model (its shared part) and
:func:`personalise_site` scores, on the site's own validation split (the one it reports every round):

- ``global``: the final global shared part with this site's local part (with no local part: the global model);
- ``personal``: that, fine-tuned for N epochs (without ``finetune``: the same model as ``global``);
- ``alone``: the site-alone model (with ``alone``).

Each model is saved in the site's folder (:data:`PERSONAL_DIR`) as a whole site model (every trained tensor):
``fedfms predict`` and ``fedfms evaluate`` take any of them as ``--weights``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from fedfms.errors import ConfigError
from fedfms.models.travel import LOCAL_PARTS, check_local_parts
from fedfms.models.checkpoint import read_state_dict

FINETUNE = "finetune"
ALONE = "alone"
PERSONAL_DIR = "fedfms_personal"  # in the site's run folder (beside FLARE's log of the job at that site)
LOCAL_PART_FILE = "local_part.pt"  # the site's local part after its last round (read back if the site restarts)
MODEL_FILES = {"global": "global_model.pt", "personal": "personal_model.pt", "alone": "alone_model.pt"}
SITE_MODEL_KEY = "fedfms_site_model"  # what a site model file says about itself, beside its "model" state dict
# What a site's personalised model may lose against the better of the global and the site-alone model before a
# report flags it: the validation Dice of the small demo sites moves by about this much from one seed to another.
NOISE_DICE = 0.02

_FINETUNE = re.compile(r"^finetune:(\d+)$")


@dataclass(frozen=True)
class Personalisation:
    """A parsed ``personalise`` setting."""

    local_parts: tuple[str, ...] = ()
    finetune_epochs: int = 0
    alone: bool = False

    @classmethod
    def parse(cls, text, where: str = "personalise") -> "Personalisation | None":
        """``"norm,finetune:5"`` -> Personalisation; None or "" -> None (the job is not personalised)."""
        if text is None or text == "":
            return None
        if not isinstance(text, str):
            raise ConfigError(f"{where} is {text!r}; expected a comma-separated string such as 'norm,finetune:5'")
        parts, epochs, alone = [], 0, False
        for token in (t.strip() for t in text.split(",")):
            match = _FINETUNE.match(token)
            if token in LOCAL_PARTS:
                parts.append(token)
            elif match and int(match.group(1)) > 0:
                epochs = int(match.group(1))
            elif token == ALONE:
                alone = True
            else:
                raise ConfigError(f"{where}: {token!r} in {text!r}; expected some of {', '.join(LOCAL_PARTS)}, "
                                  f"{FINETUNE}:N (N > 0 local epochs) and {ALONE}, comma-separated")
        if not parts and not epochs:
            raise ConfigError(f"{where}: {text!r} personalises nothing; add {', '.join(LOCAL_PARTS)} or {FINETUNE}:N "
                              f"({ALONE} only adds the site-alone comparison)")
        return cls(check_local_parts(parts, where), epochs, alone)

    def __str__(self) -> str:
        tokens = list(self.local_parts)
        if self.finetune_epochs:
            tokens.append(f"{FINETUNE}:{self.finetune_epochs}")
        if self.alone:
            tokens.append(ALONE)
        return ",".join(tokens)

    def describe(self) -> str:
        """In words, for captions: what stays at each site and what happens after the last round."""
        kept = {"norm": "normalisation layers", "head": "class head", "decoder": "mask decoder and head"}
        words = []
        if self.local_parts:
            words.append("keeps its own " + " and ".join(kept[p] for p in self.local_parts))
        if self.finetune_epochs:
            words.append(f"fine-tunes the final global model for {self.finetune_epochs} local epoch(s)")
        return "each site " + " and ".join(words)


SCORE_KEYS = ("dice", "iou", "volume_dice", "volume_iou", "dice_reference", "iou_reference", "num_samples")


def _finite(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v) if isinstance(v, float) else v
    return None


def scores(metrics: Mapping) -> dict:
    """The part of ``LocalTrainer.evaluate``'s metrics a personalisation record keeps (JSON-safe: NaN -> None)."""
    out = {k: _finite(metrics.get(k)) for k in SCORE_KEYS}
    if metrics.get("classes"):
        out["classes"] = list(metrics["classes"])
        out["dice_per_class"] = [_finite(v) for v in metrics.get("dice_per_class", [])]
    return out


def save_site_model(path: str | os.PathLike, weights: Mapping[str, torch.Tensor], info: Mapping) -> Path:
    """A whole site model (every trained tensor) as ``{"model": state dict, SITE_MODEL_KEY: info}``, written whole or
    not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": {k: v.detach().cpu() for k, v in weights.items()}, SITE_MODEL_KEY: dict(info)}, tmp)
    os.replace(tmp, path)
    return path


def save_local_part(folder: str | os.PathLike, weights: Mapping[str, torch.Tensor]) -> Path | None:
    """Keep the site's local part on disk after each round: a site whose process starts again (the simulator's
    sites taking turns, a restarted client) goes on with its own part instead of the initial one."""
    if not weights:
        return None
    path = Path(folder) / LOCAL_PART_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in weights.items()}, tmp)
    os.replace(tmp, path)
    return path


def read_local_part(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    path = Path(folder) / LOCAL_PART_FILE
    if not path.is_file():
        return None

    return read_state_dict(path, "site local part", "the local part this site saved after a round")


def _fit(trainer, epochs: int, should_abort: Callable[[], bool] | None) -> bool:
    """``epochs`` single-epoch fits (a new shuffle each epoch, as ``evaluation.baselines.train_alone``); False when
    aborted."""
    for _ in range(epochs):
        if trainer.fit(epochs=1, should_abort=should_abort).get("aborted"):
            return False
    return True


def personalise_site(trainer, global_weights: Mapping[str, torch.Tensor], setting: Personalisation, out_dir: str | os.PathLike,
                     alone_epochs: int = 0, initial_weights: Mapping[str, torch.Tensor] | None = None,
                     site: str | None = None, should_abort: Callable[[], bool] | None = None) -> dict:
    """What one site does after the last round (``trainer``: its :class:`~fedfms.training.trainer.LocalTrainer`,
    holding its local part): score the final global model with its local part, fine-tune it (``finetune:N``),
    train alone from ``initial_weights`` for ``alone_epochs`` epochs (``alone``), each scored on the site's validation
    split and saved in ``out_dir``. The trainer's model is put back as it was, so the job's cross-site evaluation
    sees the site as the federation left it. Returns ``{"global", "personal", "alone"?: scores, "files": {...}}``;
    ``{"aborted": True}`` when ``should_abort`` fires."""
    out_dir = Path(out_dir)
    before = trainer.trained_weights()
    rounds_done = trainer.rounds_done
    info = {"site": site or trainer.site, "local_parts": list(setting.local_parts), "personalise": str(setting)}
    result: dict = {"files": {}}
    try:
        trainer.load_travel_weights(global_weights)
        result["global"] = scores(trainer.evaluate("val"))
        result["files"]["global"] = str(save_site_model(out_dir / MODEL_FILES["global"], trainer.trained_weights(),
                                                        {**info, "kind": "global", "val": result["global"]}))
        if setting.finetune_epochs:
            trainer.reset_optimizer()
            if not _fit(trainer, setting.finetune_epochs, should_abort):
                return {"aborted": True}
            result["personal"] = scores(trainer.evaluate("val"))
        else:
            result["personal"] = dict(result["global"])
        result["files"]["personal"] = str(save_site_model(
            out_dir / MODEL_FILES["personal"], trainer.trained_weights(),
            {**info, "kind": "personal", "finetune_epochs": setting.finetune_epochs, "val": result["personal"]}))
        if setting.alone and alone_epochs:
            if initial_weights is None:
                raise ConfigError("personalise 'alone': the site's initial model was not kept")
            trainer.load_trained_weights(initial_weights)
            trainer.reset_optimizer()
            trainer.rounds_done = 0  # the same shuffles as a site that never federated (train_alone)
            if not _fit(trainer, alone_epochs, should_abort):
                return {"aborted": True}
            result["alone"] = scores(trainer.evaluate("val"))
            result["alone_epochs"] = alone_epochs
            result["files"]["alone"] = str(save_site_model(out_dir / MODEL_FILES["alone"], trainer.trained_weights(),
                                                           {**info, "kind": "alone", "epochs": alone_epochs, "val": result["alone"]}))
        return result
    finally:
        trainer.load_trained_weights(before)
        trainer.reset_optimizer()
        trainer.rounds_done = rounds_done
