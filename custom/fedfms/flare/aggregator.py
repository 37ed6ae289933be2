"""Sample-weighted FedAvg that first checks every contribution."""

from __future__ import annotations

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator

from fedfms.flare.update_check import FROZEN_FINGERPRINT, expected_travel_spec, find_problems


class CheckedFedAvgAggregator(InTimeAccumulateWeightedAggregator):
    """FLARE's ``InTimeAccumulateWeightedAggregator`` (weight = ``NUM_STEPS_CURRENT_ROUND``, which our
    executor sets to the site's number of training samples, so the result is sum(n_k w_k) / sum(n_k)),
    preceded by a check: a contribution with unexpected or missing keys, wrong shapes, NaN/inf values or
    no positive sample count is rejected and logged with the site's name; the round goes on with the others.
    So is a site whose frozen weights (FedMSA's encoder) differ from the server's global model (the
    ``persistor_id`` component's :class:`TravelSetModel`; without one, from the first site accepted):
    averaging adapters trained on different encoders would be meaningless.
    """

    def __init__(self, model_config: dict, expected_data_kind: str = "WEIGHTS", persistor_id: str = "persistor", **kwargs):
        super().__init__(expected_data_kind=expected_data_kind, **kwargs)
        self.model_config = dict(model_config)
        self.persistor_id = persistor_id
        self.rejected: list[tuple[str, str]] = []
        self.reference_fingerprint: tuple[str, str] | None = None  # (site, fingerprint) of the first accepted site

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
        fingerprint = dxo.get_meta_prop(FROZEN_FINGERPRINT)
        if self.reference_fingerprint is None:
            self.reference_fingerprint = self._server_fingerprint(fl_ctx)
        if not isinstance(fingerprint, str):
            problems.append(f"no fingerprint of the frozen weights (meta {FROZEN_FINGERPRINT})")
        elif self.reference_fingerprint and fingerprint != self.reference_fingerprint[1]:
            ref_site, ref = self.reference_fingerprint
            problems.append(f"its frozen weights differ from {ref_site}'s (fingerprint {fingerprint[:12]} vs {ref[:12]}): "
                            "another SAM checkpoint file or init_seed")
        if problems:
            return self._reject(fl_ctx, site, "; ".join(problems))
        accepted = super().accept(shareable, fl_ctx)
        if accepted and self.reference_fingerprint is None:
            self.reference_fingerprint = (site, fingerprint)
            self.log_info(fl_ctx, f"frozen-weights fingerprint of this run: {fingerprint[:12]} (from {site})")
        return accepted

    def _server_fingerprint(self, fl_ctx: FLContext) -> tuple[str, str] | None:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id) if self.persistor_id else None
        fingerprint = getattr(getattr(persistor, "model", None), "fingerprint", None)
        return ("the server's global model", fingerprint) if isinstance(fingerprint, str) else None

    def _reject(self, fl_ctx: FLContext, site: str, reason: str) -> bool:
        self.rejected.append((site, reason))
        self.log_error(fl_ctx, f"rejected contribution from {site}: {reason}")
        return False
