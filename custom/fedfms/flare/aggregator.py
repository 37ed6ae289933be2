"""Sample-weighted FedAvg that first checks every contribution."""

from __future__ import annotations

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator

from fedfms.flare.update_check import expected_travel_spec, find_problems


class CheckedFedAvgAggregator(InTimeAccumulateWeightedAggregator):
    """FLARE's ``InTimeAccumulateWeightedAggregator`` (weight = ``NUM_STEPS_CURRENT_ROUND``, which our
    executor sets to the site's number of training samples, so the result is sum(n_k w_k) / sum(n_k)),
    preceded by a check: a contribution with unexpected or missing keys, wrong shapes, NaN/inf values or
    no positive sample count is rejected and logged with the site's name; the round goes on with the others.
    """

    def __init__(self, model_config: dict, expected_data_kind: str = "WEIGHTS", **kwargs):
        super().__init__(expected_data_kind=expected_data_kind, **kwargs)
        self.model_config = dict(model_config)
        self.rejected: list[tuple[str, str]] = []

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:
            return self._reject(fl_ctx, site, f"not a DXO ({exc})")
        problems = find_problems(dxo.data or {}, expected_travel_spec(self.model_config))
        n = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            problems.append(f"sample count (meta {MetaKey.NUM_STEPS_CURRENT_ROUND}) is {n!r}, expected a positive integer")
        if problems:
            return self._reject(fl_ctx, site, "; ".join(problems))
        return super().accept(shareable, fl_ctx)

    def _reject(self, fl_ctx: FLContext, site: str, reason: str) -> bool:
        self.rejected.append((site, reason))
        self.log_error(fl_ctx, f"rejected contribution from {site}: {reason}")
        return False
