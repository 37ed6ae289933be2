"""Checks a contribution against the travel set before it can touch the global model."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedfms.models import ModelConfig, build_model_on_meta, travel_spec

# DXO meta key: the site's fedfms.models.frozen_fingerprint, checked by the server across sites
FROZEN_FINGERPRINT = "fedfms_frozen_fingerprint"


@lru_cache(maxsize=8)
def _spec_for(frozen: tuple) -> dict:
    cfg = ModelConfig.from_dict(dict(frozen))
    return travel_spec(build_model_on_meta(cfg), cfg.mode)


def expected_travel_spec(model_config: dict) -> dict:
    """key -> (shape, dtype) of what travels for this model configuration (built on the meta device)."""
    relevant = {k: v for k, v in model_config.items() if k not in ("checkpoint", "pretrained")}
    return _spec_for(tuple(sorted(relevant.items())))


def find_problems(data: dict, spec: dict, max_items: int = 3) -> list[str]:
    """Human-readable reasons why ``data`` is not a valid travel-set update (empty list: valid)."""
    problems = []
    extra = sorted(set(data) - set(spec))
    missing = sorted(set(spec) - set(data))
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) e.g. {extra[:max_items]}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) e.g. {missing[:max_items]}")
    for key in sorted(set(data) & set(spec)):
        value = np.asarray(data[key])
        if tuple(value.shape) != spec[key][0]:
            problems.append(f"'{key}' has shape {tuple(value.shape)}, expected {spec[key][0]}")
        elif value.dtype.kind == "f" and not np.isfinite(value).all():
            problems.append(f"'{key}' has NaN/inf values")
        if len(problems) >= max_items + 2:
            break
    return problems
