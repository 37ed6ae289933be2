"""A personalised job's last step at the server: FLARE's own ``BroadcastAndProcess`` workflow sends the final global
model to every site (task ``personalise``, after ``ScatterAndGather`` and before cross-site evaluation), and
:class:`PersonalisationRecorder` (its ``ResponseProcessor``) keeps what each site answers: the validation scores of
the global, personalised and site-alone models (:func:`fedfms.training.personal.personalise_site`). Nothing of a
site's models comes back; the record is ``fedfms_personal.json`` in the server's run folder, read by
``fedfms report``, ``fedfms simulate`` (a site without a personalised model is a gap) and ``fedfms loso``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from nvflare.apis.client import Client
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.response_processor import ResponseProcessor

from fedfms.evaluation.personal import PERSONAL_RECORD, site_entry_problems
from fedfms.flare.replies import REASON_HEADER

GLOBAL_MODEL_NAME = "FL_global_model.pt"  # the final global model, as FLARE's PT persistor names it


class PersonalisationRecorder(ResponseProcessor):
    """Args:
        personalise: the job's ``personalise`` setting (recorded with the results).
        model_locator_id: FLARE's ``PTFileModelLocator``, which finds the final global model.
        expected_sites: the job's sites (default: the clients connected when the step starts).
        alone_epochs: the site-alone comparison's epochs (recorded).
    """

    def __init__(self, personalise: str, model_locator_id: str = "model_locator", expected_sites: list[str] | None = None,
                 alone_epochs: int = 0):
        super().__init__()
        self.personalise = personalise
        self.model_locator_id = model_locator_id
        self.expected_sites = sorted(expected_sites) if expected_sites else None
        self.alone_epochs = int(alone_epochs)
        self.results: dict[str, dict] = {}
        self._sites: list[str] = []
        self._started = 0.0

    def create_task_data(self, task_name: str, fl_ctx: FLContext) -> Shareable:
        engine = fl_ctx.get_engine()
        locator = engine.get_component(self.model_locator_id)
        locator.get_model_names(fl_ctx)  # the locator's inventory of the persistor's saved models
        dxo = locator.locate_model(GLOBAL_MODEL_NAME, fl_ctx)
        self.results = {}
        self._sites = self.expected_sites or sorted(c.name for c in engine.get_clients())
        self._started = time.time()
        # written now and again at the end: a step that never ends leaves every site recorded without its model
        self._write(fl_ctx, {site: {"status": "failed", "reason": "the personalisation step did not finish"} for site in self._sites})
        self.log_info(fl_ctx, f"personalising ({self.personalise}) at {', '.join(self._sites)} from the final global model "
                              f"({len(dxo.data)} shared tensors)")
        return dxo.to_shareable()

    def process_client_response(self, client: Client, task_name: str, response: Shareable, fl_ctx: FLContext) -> bool:
        site = client.name
        rc = response.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            reason = response.get_header(REASON_HEADER) or f"return code {rc}"
            self.results[site] = {"status": "failed", "reason": reason}
            self.log_error(fl_ctx, f"{site} has no personalised model: {reason}")
            return True  # the others go on; the record names the gap
        try:
            dxo = from_shareable(response)
            entry = dict(dxo.data) if dxo.data_kind == DataKind.METRICS else None
            problems = site_entry_problems(entry) if entry is not None else [f"{dxo.data_kind}, expected {DataKind.METRICS} scores"]
        except Exception as exc:
            entry, problems = None, [f"not a DXO ({type(exc).__name__}: {exc})"]
        if problems:
            self.results[site] = {"status": "failed", "reason": "; ".join(problems)}
            self.log_error(fl_ctx, f"{site}'s personalisation answer refused: {'; '.join(problems)}")
        else:
            self.results[site] = {"status": "ok", **entry}
            self.log_info(fl_ctx, f"{site}: global Dice {entry['global'].get('dice')}, personalised Dice "
                                  f"{entry['personal'].get('dice')}"
                                  + (f", alone Dice {entry['alone'].get('dice')}" if "alone" in entry else ""))
        return True

    def final_process(self, fl_ctx: FLContext) -> bool:
        for site in self._sites:
            self.results.setdefault(site, {"status": "failed", "reason": "no answer before the step's timeout"})
        path = self._write(fl_ctx, self.results)
        missing = sorted(s for s, r in self.results.items() if r.get("status") != "ok")
        if missing:
            self.log_error(fl_ctx, f"personalisation: no personalised model at {', '.join(missing)} ({path})")
        else:
            self.log_info(fl_ctx, f"personalisation done at every site ({path})")
        return True  # a missing site is a gap in the record (and the exit code), not a reason to end the job

    def _write(self, fl_ctx: FLContext, sites: dict) -> Path:
        record = {"personalise": self.personalise, "alone_epochs": self.alone_epochs, "expected_sites": self._sites,
                  "seconds": round(time.time() - self._started, 1), "sites": sites}
        path = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())) / PERSONAL_RECORD
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
        return path
