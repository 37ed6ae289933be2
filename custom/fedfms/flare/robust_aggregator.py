"""Opt-in robust aggregation (``fedfms job new --aggregation median|trimmed_mean`` or ``--norm-bound K``).

Plain FedAvg stays FLARE's own ``InTimeAccumulateWeightedAggregator``. This aggregator keeps the round's
accepted updates (they were checked by ``ContributionCheckFilter`` before reaching it), because a norm bound
and a coordinate-wise median need all of them at once, then applies :mod:`fedfms.aggregation`.
"""

from __future__ import annotations

import threading

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from fedfms.aggregation import METHODS, NORM_BOUND_ACTIONS, aggregate, bound_update_norms


class RobustAggregator(Aggregator):
    """Args:
        method: "mean" (sample-weighted, as FedAvg), "median" or "trimmed_mean" (coordinate-wise, unweighted).
        trim_fraction: share of the largest and of the smallest values dropped per coordinate (trimmed_mean).
        norm_bound: clip (or drop) an update whose distance from the global model exceeds ``norm_bound`` x the
            round's median distance; None: no bound.
        norm_bound_action: "clip" or "reject".
    """

    def __init__(self, method: str = "mean", trim_fraction: float = 0.2, norm_bound: float | None = None,
                 norm_bound_action: str = "clip", expected_data_kind: str = DataKind.WEIGHTS):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method is {method!r}; expected one of {METHODS}")
        if norm_bound_action not in NORM_BOUND_ACTIONS:
            raise ValueError(f"norm_bound_action is {norm_bound_action!r}; expected one of {NORM_BOUND_ACTIONS}")
        self.method = method
        self.trim_fraction = float(trim_fraction)
        self.norm_bound = float(norm_bound) if norm_bound else None
        self.norm_bound_action = norm_bound_action
        self.expected_data_kind = expected_data_kind
        self._lock = threading.Lock()
        self._updates: dict[str, tuple[float, dict]] = {}

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return False
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if contribution_round != current_round:
            self.log_warning(fl_ctx, f"discarding {site}'s result for round {contribution_round} in round {current_round}")
            return False
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:
            self.log_error(fl_ctx, f"{site}: not a DXO ({exc})")
            return False
        if dxo.data_kind != self.expected_data_kind or not dxo.data:
            self.log_error(fl_ctx, f"{site}: expected {self.expected_data_kind} with weights, got {dxo.data_kind}")
            return False
        with self._lock:
            if site in self._updates:
                self.log_warning(fl_ctx, f"discarding a second result from {site} in round {current_round}")
                return False
            self._updates[site] = (float(dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 1)), dxo.data)
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        with self._lock:
            updates = dict(self._updates)
            self._updates.clear()
        if not updates:
            return DXO(self.expected_data_kind, {}).to_shareable()
        sites = sorted(updates)
        weights = [updates[s][1] for s in sites]
        counts = [updates[s][0] for s in sites]
        if self.norm_bound:
            global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            reference = global_model[ModelLearnableKey.WEIGHTS]
            if self.expected_data_kind == DataKind.WEIGHT_DIFF:  # an update is already its distance from the model
                reference = {k: np.zeros_like(np.asarray(v)) for k, v in reference.items()}
            bounded, distances, bound = bound_update_norms(weights, reference, self.norm_bound, self.norm_bound_action)
            for site, d, b in zip(sites, distances, bounded):
                if d > bound and d > 0:
                    verb = "dropped" if b is None else "clipped"
                    self.log_warning(fl_ctx, f"{site}'s update moved {d:.4g} from the global model, more than "
                                             f"{self.norm_bound} x the round's median ({bound:.4g}): {verb}")
            kept = [(s, w, n) for s, w, n in zip(sites, bounded, counts) if w is not None]
            sites, weights, counts = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
        if not weights:
            return DXO(self.expected_data_kind, {}).to_shareable()
        result = aggregate(weights, counts, self.method, self.trim_fraction)
        self.log_info(fl_ctx, f"{self.method} of {len(sites)} update(s) from {sites}")
        return DXO(self.expected_data_kind, result).to_shareable()

    def reset(self, fl_ctx: FLContext):
        with self._lock:
            self._updates.clear()
