"""The files a centralised training run leaves: the selected epoch's weights, the last epoch's beside them, and
the per-epoch history. Both centralised trainers (``fedfms.evaluation.centralized`` for SAM and the U-Net,
``fedfms.nnunet.evaluate`` for nnU-Net) write them and the LOSO protocol reads them, so they live below both."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch


def last_weights_path(out_weights: str | os.PathLike) -> Path:
    """Where a centralised training run keeps the last epoch's weights next to the selected ones."""
    out = Path(out_weights)
    return out.with_name(f"{out.stem}_last{out.suffix or '.pt'}")


def history_path(out_weights: str | os.PathLike) -> Path:
    return Path(out_weights).with_suffix(".json")


def save_weights(weights: Mapping[str, torch.Tensor], path: Path) -> None:
    # FLARE's persistor layout ({"model": travel set}), so load_model / `fedfms predict` read it unchanged.
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": dict(weights)}, tmp)
    os.replace(tmp, path)
