"""Result filter: only the travel set of the job's mode may leave a site."""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedfms.flare.update_check import expected_travel_spec
from fedfms.models.travel import check_mode, is_travel_key


class TravelSetLeak(RuntimeError):
    """A site tried to send tensors outside the travel set; FLARE then sends an error reply, no data."""


class TravelSetFilter(DXOFilter):
    """Refuses any task result whose weights hold a tensor outside the travel set (FedMSA: the frozen
    encoder), or miss one. FLARE turns the refusal into ``TASK_RESULT_FILTER_ERROR``: nothing is sent.

    Args:
        mode: "fedmsa" or "fedsam" (every key travels in FedSAM; the filter still checks the set).
        model_config: when given, the exact key set and shapes are checked as well.
    """

    def __init__(self, mode: str, model_config: dict | None = None):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF], data_kinds_to_filter=None)
        self.mode = check_mode(mode)
        self.model_config = model_config
        self._spec = None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        leaked = sorted(k for k in dxo.data if not is_travel_key(k, self.mode))
        if leaked:
            self.log_error(fl_ctx, f"refusing to send {len(leaked)} tensor(s) outside the {self.mode} travel set, e.g. {leaked[:3]}")
            raise TravelSetLeak(f"{len(leaked)} tensor(s) outside the {self.mode} travel set, e.g. {leaked[0]}")
        if self.model_config is not None:
            if self._spec is None:
                self._spec = expected_travel_spec({**self.model_config, "mode": self.mode})
            missing = sorted(set(self._spec) - set(dxo.data))
            if missing:
                raise TravelSetLeak(f"{len(missing)} travel tensor(s) missing from the result, e.g. {missing[0]}")
        self.log_info(fl_ctx, f"result holds only the {len(dxo.data)} {self.mode} travel tensors")
        return dxo
