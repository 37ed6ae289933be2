"""Result filter: only the travel set of the job's mode may leave a site (in a personalised job: the trained
tensors less the site's local part)."""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedfms.flare.replies import error_reply
from fedfms.flare.update_check import expected_travel_spec, key_problems, local_part_problems
from fedfms.models.travel import check_mode, is_travel_key


def model_result(shareable: Shareable) -> DXO | None:
    """The model a successful result carries (weights or their difference); None for anything else (an error
    reply, metrics): nothing of the model can leave in it."""
    if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        return None
    try:
        dxo = from_shareable(shareable)
    except Exception:
        return None
    return dxo if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF) else None


class TravelSetFilter(Filter):
    """Refuses any task result whose weights hold a tensor outside the travel set (FedMSA: the frozen
    encoder; a personalised job: the site's local part too), or miss one. The refused result is replaced by an
    error reply that says why (no data leaves the site); the server records the reason against the site.

    Args:
        mode: "fedmsa" or "fedsam" (every key travels in FedSAM; the filter still checks the set).
        model_config: when given, the exact key set is checked as well (the server's check, run before sending);
            its ``local_parts`` name what must stay at the site.
    """

    def __init__(self, mode: str, model_config: dict | None = None):
        super().__init__()
        self.mode = check_mode(mode)
        self.model_config = model_config
        self._spec = None

    def problems(self, data: dict) -> list[str]:
        leaked = sorted(k for k in data if not is_travel_key(k, self.mode))
        if leaked:
            return [f"{len(leaked)} tensor(s) outside the {self.mode} travel set, e.g. {leaked[:3]}"]
        if self.model_config is None:
            return []
        config = {**self.model_config, "mode": self.mode}
        if self._spec is None:
            self._spec = expected_travel_spec(config)
        return local_part_problems(data, config) + key_problems(data, self._spec)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = model_result(shareable)
        if dxo is None or not dxo.data:
            return shareable
        problems = self.problems(dxo.data)
        if problems:
            reason = "; ".join(problems)
            self.log_error(fl_ctx, f"refusing to send the result: {reason}")
            return error_reply(ReturnCode.TASK_RESULT_FILTER_ERROR, f"the site's travel-set filter refused to send it: {reason}",
                               shareable)
        self.log_info(fl_ctx, f"result holds only the {len(dxo.data)} {self.mode} travel tensors")
        return shareable
