"""Robust aggregation rules for the opt-in robust mode (plain FedAvg is FLARE's own aggregator).

Plain numpy, no FLARE: ``fedfms.flare.robust_aggregator`` applies these to the round's accepted updates.
Every rule works on dicts key -> array and accumulates in float64.

- :func:`bound_update_norms`: an update whose distance from the global model exceeds ``k`` times the round's
  median distance is clipped to that radius (or dropped). Scaling a model up (a site sending weights x1000)
  or replacing it wholesale is then bounded by what the honest majority moved.
- :func:`weighted_mean`: sum(n_k w_k) / sum(n_k) (FedAvg).
- :func:`coordinate_median` / :func:`trimmed_mean`: per coordinate, unweighted; a minority of arbitrary
  updates cannot move the result outside the honest sites' range.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

METHODS = ("mean", "median", "trimmed_mean")
NORM_BOUND_ACTIONS = ("clip", "reject")

Weights = Mapping[str, np.ndarray]


def update_distance(weights: Weights, reference: Weights) -> float:
    """L2 distance between two models over their float tensors, in float64."""
    total = 0.0
    for key, value in weights.items():
        v = np.asarray(value)
        if v.dtype.kind != "f":
            continue
        diff = v.astype(np.float64) - np.asarray(reference[key], dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def bound_update_norms(updates: Sequence[Weights], reference: Weights, k: float, action: str = "clip"
                       ) -> tuple[list[Weights | None], list[float], float]:
    """Bound each update's distance from ``reference`` by ``k`` x the median distance of the round.

    Returns the (possibly clipped) updates, with ``None`` for a dropped one (``action="reject"``), every
    update's original distance, and the bound that was applied."""
    if k <= 0:
        raise ValueError(f"norm bound k is {k}; expected a positive number")
    if action not in NORM_BOUND_ACTIONS:
        raise ValueError(f"norm bound action is {action!r}; expected one of {NORM_BOUND_ACTIONS}")
    distances = [update_distance(u, reference) for u in updates]
    if not distances:
        return [], [], 0.0
    bound = k * float(np.median(distances))
    out: list[Weights | None] = []
    for update, d in zip(updates, distances):
        if d <= bound or d == 0.0:
            out.append(update)
        elif action == "reject":
            out.append(None)
        else:
            scale = bound / d
            out.append({key: (np.asarray(reference[key], np.float64)
                              + (np.asarray(v, np.float64) - np.asarray(reference[key], np.float64)) * scale)
                        if np.asarray(v).dtype.kind == "f" else v for key, v in update.items()})
    return out, distances, bound


def weighted_mean(updates: Sequence[Weights], weights: Sequence[float]) -> dict[str, np.ndarray]:
    total_weight = float(sum(weights))
    if not updates or total_weight <= 0:
        raise ValueError("weighted mean of no updates (or zero total weight)")
    keys = updates[0].keys()
    return {k: sum(np.asarray(u[k], np.float64) * float(w) for u, w in zip(updates, weights)) / total_weight for k in keys}


def coordinate_median(updates: Sequence[Weights]) -> dict[str, np.ndarray]:
    if not updates:
        raise ValueError("median of no updates")
    return {k: np.median(np.stack([np.asarray(u[k], np.float64) for u in updates]), axis=0) for k in updates[0]}


def trimmed_mean(updates: Sequence[Weights], trim_fraction: float) -> dict[str, np.ndarray]:
    """Per coordinate: drop the ``floor(trim_fraction * n)`` largest and smallest values, average the rest."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction is {trim_fraction}; expected 0 <= trim_fraction < 0.5")
    if not updates:
        raise ValueError("trimmed mean of no updates")
    n = len(updates)
    cut = int(np.floor(trim_fraction * n))
    out = {}
    for k in updates[0]:
        stacked = np.sort(np.stack([np.asarray(u[k], np.float64) for u in updates]), axis=0)
        out[k] = stacked[cut:n - cut].mean(axis=0)
    return out


def aggregate(updates: Sequence[Weights], sample_counts: Sequence[float], method: str = "mean",
              trim_fraction: float = 0.2) -> dict[str, np.ndarray]:
    if method == "mean":
        return weighted_mean(updates, sample_counts)
    if method == "median":
        return coordinate_median(updates)
    if method == "trimmed_mean":
        return trimmed_mean(updates, trim_fraction)
    raise ValueError(f"aggregation method is {method!r}; expected one of {METHODS}")
