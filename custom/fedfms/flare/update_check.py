"""Checks a contribution against the travel set and the federation's rules before it can touch the global
model. Plain numpy: the site-side travel-set filter and the server-side contribution filter share it, and
tests call it without FLARE.

Nothing here raises on bad input: every problem (including an exception while looking at the data) comes
back as a human-readable reason, so one malformed update can never take a round down with it.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache
from typing import Mapping

import numpy as np
import torch

from fedfms.models import ModelConfig, build_model_on_meta, local_spec, travel_spec

# DXO meta key: the site's fedfms.models.frozen_fingerprint, checked by the server across sites
FROZEN_FINGERPRINT = "fedfms_frozen_fingerprint"

# A sample count above this is refused unless the job pins or raises it (``max_samples``): the largest
# prepared site of the paper's datasets holds tens of thousands of 2D slices, not billions.
DEFAULT_MAX_SAMPLES = 1_000_000


@lru_cache(maxsize=8)
def _specs_for(frozen: tuple) -> tuple[dict, dict]:
    cfg = ModelConfig.from_dict(dict(frozen))
    model = build_model_on_meta(cfg)
    return travel_spec(model, cfg.mode, cfg.local_parts), local_spec(model, cfg.mode, cfg.local_parts)


def _frozen(model_config: dict) -> tuple:
    relevant = {k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items() if k not in ("checkpoint", "pretrained")}
    return tuple(sorted(relevant.items()))


def expected_travel_spec(model_config: dict) -> dict:
    """key -> (shape, torch dtype) of what travels for this model configuration (built on the meta device): the
    trained tensors less the sites' local part (``local_parts``)."""
    return _specs_for(_frozen(model_config))[0]


def expected_local_spec(model_config: dict) -> dict:
    """key -> (shape, torch dtype) of what each site keeps (``local_parts``; empty for a job that keeps nothing)."""
    return _specs_for(_frozen(model_config))[1]


def _numpy_dtype(dtype) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).numpy().dtype
    return np.dtype(dtype)


def key_problems(keys, spec: Mapping, max_items: int = 3) -> list[str]:
    """Unexpected and missing keys (the part of the check the site-side filter runs before sending)."""
    keys = set(keys)
    problems = []
    extra = sorted(keys - set(spec))
    missing = sorted(set(spec) - keys)
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) e.g. {extra[:max_items]}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) e.g. {missing[:max_items]}")
    return problems


def local_part_problems(keys, model_config: Mapping, max_items: int = 3) -> list[str]:
    """Tensors of the sites' local part (``local_parts`` of a personalised job) in a result: they never leave a
    site, so their presence is named as such (besides being unexpected)."""
    parts = model_config.get("local_parts") or ()
    if not parts:
        return []
    leaked = sorted(set(keys) & set(expected_local_spec(dict(model_config))))
    if not leaked:
        return []
    return [f"{len(leaked)} tensor(s) of the sites' local part ({', '.join(parts)}) e.g. {leaked[:max_items]}: "
            "a personalised job keeps them at each site"]


def _value_problem(key: str, value, shape: tuple, dtype: np.dtype) -> str | None:
    if not isinstance(value, np.ndarray):
        return f"'{key}' is a {type(value).__name__}, expected a numpy array"
    if tuple(value.shape) != tuple(shape):
        return f"'{key}' has shape {tuple(value.shape)}, expected {tuple(shape)}"
    if value.dtype != dtype:
        return f"'{key}' has dtype {value.dtype}, expected {dtype}"
    if value.dtype.kind in "fc" and not np.isfinite(value).all():
        return f"'{key}' has NaN/inf values"
    return None


def find_problems(data, spec: Mapping, max_items: int = 3) -> list[str]:
    """Human-readable reasons why ``data`` is not a valid travel-set update (empty list: valid): unexpected
    or missing keys, a value that is not an array, wrong shape, a dtype other than the spec's, NaN/inf."""
    try:
        if not isinstance(data, Mapping):
            return [f"weights are a {type(data).__name__}, expected a dict of arrays"]
        problems = key_problems(data, spec, max_items)
        for key in sorted(set(data) & set(spec)):
            shape, dtype = spec[key]
            problem = _value_problem(key, data[key], shape, _numpy_dtype(dtype))
            if problem:
                problems.append(problem)
            if len(problems) >= max_items + 2:
                break
        return problems
    except Exception as exc:  # never let a malformed update raise inside the server
        return [f"weights could not be checked ({type(exc).__name__}: {exc})"]


def sample_count_problem(n, max_samples: int, pinned: int | None = None, first_accepted: int | None = None) -> str | None:
    """The FedAvg weight n_k a site reports: a positive integer, at most ``max_samples``, equal to the count
    the consortium pinned for the site (if any) and to the count of its first accepted round (datasets do not
    change during a job; a change is how one site would take over the average)."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool):
        return f"sample count is {n!r}, expected a positive integer"
    n = int(n)
    if n <= 0:
        return f"sample count is {n}, expected a positive integer"
    if pinned is not None and n != pinned:
        return f"sample count is {n}, but the job pins this site's count at {pinned}"
    if pinned is None and n > max_samples:
        return f"sample count is {n}, above the job's max_samples {max_samples}"
    if first_accepted is not None and n != first_accepted:
        return f"sample count changed from {first_accepted} (its first accepted round) to {n}"
    return None


def metric_problems(metrics) -> list[str]:
    """Self-reported validation metrics (used to pick the best model): finite numbers in [0, 1]."""
    if metrics is None:
        return []
    if not isinstance(metrics, Mapping):
        return [f"validation metrics are a {type(metrics).__name__}, expected a dict"]
    problems = []
    for name, value in metrics.items():
        if value is None:
            continue
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            problems.append(f"validation metric {name!r} is {value!r}, expected a number in [0, 1]")
    return problems


def aggregate_problems(aggregate, reference: Mapping[str, np.ndarray]) -> list[str]:
    """Why an aggregated model must not replace the global model ``reference`` (same keys, shapes, finite)."""
    try:
        if not aggregate:
            return ["no accepted contribution"]
        problems = key_problems(aggregate, reference)
        for key in sorted(set(aggregate) & set(reference)):
            value = np.asarray(aggregate[key])
            if value.shape != np.shape(reference[key]):
                problems.append(f"'{key}' has shape {value.shape}, expected {np.shape(reference[key])}")
            elif value.dtype.kind in "fc" and not np.isfinite(value).all():
                problems.append(f"'{key}' has NaN/inf values")
            if len(problems) >= 5:
                break
        return problems
    except Exception as exc:
        return [f"aggregate could not be checked ({type(exc).__name__}: {exc})"]
