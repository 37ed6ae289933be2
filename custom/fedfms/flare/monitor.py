"""The server's account of every round: which sites contributed, which failed or were rejected and why,
which never answered; whether the round may update the global model; and a run record that tells the truth
about the run (``fedfms_run.json`` in the server's run folder, read by ``fedfms simulate`` and ``fedfms report``).

It only listens to FLARE's own events around the stock ``ScatterAndGather`` workflow and aggregator:

- ``AFTER_TASK_RESULT_FILTER``: a site's result after the server's checks (``ContributionCheckFilter``):
  failures and rejections are recorded with their one-line reason; a site that reports it cannot start at all
  stops the job at once.
- ``AFTER_CONTRIBUTION_ACCEPT``: what the aggregator accepted.
- ``BEFORE_AGGREGATION``: sites that never answered are named; a round with fewer accepted contributions than
  ``min_sites`` (or, with ``on_missing_site="stop"``, any missing site) stops the job with the reason.
- ``AFTER_AGGREGATION``: an aggregate that is empty, incomplete or not finite never replaces the global model
  (the previous one stays and the round is recorded as failed); a good one is cast back to the global model's
  dtypes (the contribution filter hands the aggregator float64 so the weighted sum accumulates in float64).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from nvflare.apis.analytix import TrackConst
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from fedfms.flare.contribution_filter import FATAL_HEADER, REASON_HEADER
from fedfms.flare.update_check import aggregate_problems
from fedfms.run_record import (  # noqa: F401  (RUN_RECORD and read_run_record re-exported for the FLARE layer)
    COMPLETED,
    COMPLETED_WITH_GAPS,
    FAILED,
    RUN_RECORD,
    RUNNING,
    as_float,
    read_run_record,
    site_summary,
    summarize,
)

ON_MISSING_SITE = ("continue", "stop")
# One concise line per round for the console (fedfms.flare.simulate.quiet_log_config shows this logger alone,
# without FLARE's context prefix); it reaches the log files too.
PROGRESS_LOGGER = "fedfms.progress"
TRAIN_LOSS_TAG = "train_loss"  # what the executor streams each round (fedfms.flare.executor)
ANALYTICS_EVENT = "fed.analytix_log_stats"  # the sites' streamed metrics, as the server receives them


def progress_line(round_info: dict, last_round: int | None, sites: list[str], losses: dict | None = None) -> str:
    """``round 3/10  site-1 loss 0.412 Dice 0.712 | site-2 ... | 4.1 s``: per site, the loss of its local training
    in this round and the validation Dice of the global model it started the round from; a site without a
    contribution says why in one word (failed, missing)."""
    r = round_info["round"]
    head = f"round {r + 1}/{last_round + 1}" if last_round is not None else f"round {r + 1}"
    parts = []
    for site in sites:
        if site in round_info.get("accepted", {}):
            loss = (losses or {}).get(site)
            dice = round_info.get("val_dice", {}).get(site)
            parts.append(f"{site} loss {'-' if loss is None else f'{loss:.3f}'} Dice {'-' if dice is None else f'{dice:.3f}'}")
        elif site in round_info.get("failed", {}):
            parts.append(f"{site} failed")
        else:
            parts.append(f"{site} missing")
    seconds = round_info.get("seconds")
    tail = "" if round_info.get("updated_model", True) else "  (global model not updated)"
    return f"{head}  " + " | ".join(parts) + (f" | {seconds:.1f} s" if seconds is not None else "") + tail


def default_min_sites(num_sites: int) -> int:
    """A majority of the expected sites: one site dropping out of three goes on, two do not."""
    return max(1, num_sites // 2 + 1) if num_sites > 2 else max(1, num_sites)


class FederationMonitor(Widget):
    """Args:
        expected_sites: the sites that must take part (default: the sites connected to the job at start).
        min_sites: fewest accepted contributions with which a round may update the global model (default: a
            majority of the expected sites; all of them when there are one or two).
        on_missing_site: "continue" (go on while ``min_sites`` remain, every gap named in the record) or "stop"
            (any expected site missing from a round stops the job).
        train_task_name: the workflow's training task.
        resume: set by ``fedfms job new --resume-from``: the record of the run this job continues
            (``{"record": path, "best_model": path or null, "best_metric": float or null}``); its rounds are
            carried into this run's record and its best model and metric seed the model selection.
        model_selector_id: the ``IntimeModelSelector`` whose best metric a resumed run starts from.
        persistor_id: the persistor whose best-model file a resumed run starts from.
    """

    def __init__(self, expected_sites: list[str] | None = None, min_sites: int | None = None,
                 on_missing_site: str = "continue", train_task_name: str = AppConstants.TASK_TRAIN,
                 resume: dict | None = None, model_selector_id: str = "model_selector", persistor_id: str = "persistor"):
        super().__init__()
        if on_missing_site not in ON_MISSING_SITE:
            raise ValueError(f"on_missing_site is {on_missing_site!r}; expected one of {ON_MISSING_SITE}")
        self.expected_sites = sorted(expected_sites) if expected_sites else None
        self.min_sites = min_sites
        self.on_missing_site = on_missing_site
        self.train_task_name = train_task_name
        self.resume = dict(resume or {})
        self.model_selector_id = model_selector_id
        self.persistor_id = persistor_id
        self.record: dict = {}
        self._round: dict | None = None
        self._round_start = 0.0
        self._previous_global: dict | None = None
        self._path: Path | None = None
        self.dead_sites: list[str] = []
        self._losses: dict = {}  # (site, round) -> training loss streamed by the site (for the progress line)
        self._progress = logging.getLogger(PROGRESS_LOGGER)

    # ------------------------------------------------------------------ events
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        try:
            if event_type == EventType.START_RUN:
                self._start(fl_ctx)
            elif event_type == AppEventType.TRAINING_STARTED:
                self._training_started(fl_ctx)
            elif event_type == AppEventType.ROUND_STARTED:
                self._round_started(fl_ctx)
            elif event_type == EventType.AFTER_TASK_RESULT_FILTER:
                self._result(fl_ctx)
            elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
                self._accepted(fl_ctx)
            elif event_type == AppEventType.BEFORE_AGGREGATION:
                self._before_aggregation(fl_ctx)
            elif event_type == AppEventType.AFTER_AGGREGATION:
                self._after_aggregation(fl_ctx)
            elif event_type == AppEventType.AFTER_LEARNABLE_PERSIST:
                self.record["persisted_round"] = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
                self._write()
            elif event_type == AppEventType.ROUND_DONE:
                self._round_done(fl_ctx)
            elif event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
                self.record["best"] = {"round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
                                       "metric": as_float(fl_ctx.get_prop(AppConstants.VALIDATION_RESULT))}
            elif event_type == EventType.CLIENT_DISCONNECTED:
                self._disconnected(fl_ctx)
            elif event_type == EventType.START_WORKFLOW:
                self._workflow_started(fl_ctx)
            elif event_type == EventType.FATAL_SYSTEM_ERROR:
                if not self.record.get("reason"):
                    self.record["reason"] = str(fl_ctx.get_prop(FLContextKey.EVENT_DATA, "fatal error"))
            elif event_type == EventType.END_RUN:
                self._end(fl_ctx)
            elif event_type == ANALYTICS_EVENT:
                self._streamed(fl_ctx)
        except Exception as exc:  # the monitor must never be what breaks a run
            self.log_exception(fl_ctx, f"federation monitor: {type(exc).__name__}: {exc}")

    def _start(self, fl_ctx: FLContext) -> None:
        engine = fl_ctx.get_engine()
        job_id = fl_ctx.get_job_id()
        self._path = Path(engine.get_workspace().get_run_dir(job_id)) / RUN_RECORD
        connected = sorted(c.name for c in engine.get_clients())
        expected = self.expected_sites or connected
        self.record = {
            "job_id": job_id,
            "status": RUNNING,
            "reason": None,
            "expected_sites": expected,
            "connected_at_start": connected,
            "min_sites": self.min_sites or default_min_sites(len(expected)),
            "on_missing_site": self.on_missing_site,
            "start_round": None,
            "num_rounds": None,
            "rounds": [],
            "best": None,
            "resumed_from": None,
            "persisted_round": None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        absent = sorted(set(expected) - set(connected))
        if absent:
            self.log_warning(fl_ctx, f"expected site(s) {absent} are not part of this job at start; "
                                     f"they will be recorded as missing from every round")
        self._write()

    def _seed_from_previous_run(self, fl_ctx: FLContext) -> None:
        previous = Path(self.resume["record"])
        try:
            old = json.loads(previous.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            self.system_panic(f"cannot resume: {previous}: {exc}", fl_ctx)
            return
        self.record["resumed_from"] = str(previous)
        saved = old.get("persisted_round")
        self.record["rounds"] = [r for r in old.get("rounds", [])
                                 if r.get("seconds") is not None and saved is not None and r["round"] <= saved]
        self.record["best"] = old.get("best")
        best_metric = self.resume.get("best_metric")
        selector = fl_ctx.get_engine().get_component(self.model_selector_id)
        if best_metric is not None and selector is not None and hasattr(selector, "best_val_metric"):
            selector.best_val_metric = float(best_metric)  # a later round must beat the earlier run's best
        best_model = self.resume.get("best_model")
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        target = getattr(persistor, "_best_ckpt_save_path", None)
        if best_model and target and Path(best_model).is_file():
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(best_model, target)
        self.log_info(fl_ctx, f"continuing the run recorded in {previous} ({len(self.record['rounds'])} rounds done, "
                              f"best {self.record['best']})")

    def _disconnected(self, fl_ctx: FLContext) -> None:
        site = fl_ctx.get_prop(FLContextKey.DISCONNECTED_CLIENT_NAME)
        if site and site not in self.dead_sites:
            self.dead_sites.append(site)
            self.record.setdefault("disconnected", {})[site] = (self._round or {}).get("round")
            self.log_error(fl_ctx, f"site {site} is gone (no heartbeat): the job goes on without it")
            self._write()

    def _workflow_started(self, fl_ctx: FLContext) -> None:
        # FLARE tells only the workflow running at the time that a site died; a later workflow (cross-site
        # evaluation) would wait its full timeouts for it. Tell the new one too.
        if not self.dead_sites:
            return
        controller = fl_ctx.get_engine().get_component(fl_ctx.get_prop(FLContextKey.WORKFLOW))
        communicator = getattr(controller, "communicator", None)
        if communicator is None or not hasattr(communicator, "process_dead_client_report"):
            return
        for site in self.dead_sites:
            communicator.process_dead_client_report(site, fl_ctx)
        self.log_warning(fl_ctx, f"told workflow {fl_ctx.get_prop(FLContextKey.WORKFLOW)} that {self.dead_sites} are gone")

    def _training_started(self, fl_ctx: FLContext) -> None:
        start = fl_ctx.get_prop(AppConstants.START_ROUND)
        rounds = fl_ctx.get_prop(AppConstants.NUM_ROUNDS)
        self.record["start_round"] = start
        self.record["num_rounds"] = rounds
        self.record["last_round"] = (start or 0) + (rounds or 0) - 1
        if self.resume:  # after every component's START_RUN: the persistor and selector are ready
            self._seed_from_previous_run(fl_ctx)
        self._write()

    def _round_started(self, fl_ctx: FLContext) -> None:
        r = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        self._round = {"round": r, "status": RUNNING, "accepted": {}, "failed": {}, "missing": [], "late": {},
                       "val_dice": {}, "updated_model": None, "seconds": None}
        self.record["rounds"] = [x for x in self.record["rounds"] if x.get("round") != r] + [self._round]
        self._round_start = time.monotonic()
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        self._previous_global = dict(global_model[ModelLearnableKey.WEIGHTS]) if global_model else None

    def _result(self, fl_ctx: FLContext) -> None:
        if fl_ctx.get_prop(FLContextKey.TASK_NAME) != self.train_task_name or self._round is None:
            return
        result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else "?"
        contribution_round = result.get_cookie(AppConstants.CONTRIBUTION_ROUND) if result is not None else None
        rc = result.get_return_code(ReturnCode.OK) if result is not None else "no result"
        if contribution_round is not None and contribution_round != self._round["round"]:
            self._round["late"][site] = f"result for round {contribution_round} arrived in round {self._round['round']}"
            return
        if rc == ReturnCode.OK:
            return
        reason = result.get_header(REASON_HEADER) or f"the site returned {rc}"
        self._round["failed"][site] = reason
        self.log_error(fl_ctx, f"round {self._round['round']}: no contribution from {site}: {reason}")
        if result.get_header(FATAL_HEADER):
            self._stop(fl_ctx, f"site {site} cannot run this job: {reason}")

    def _accepted(self, fl_ctx: FLContext) -> None:
        if self._round is None:
            return
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else "?"
        if not fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED):
            self._round["failed"].setdefault(site, "not accepted by the aggregator (see the server log)")
            return
        try:
            dxo = from_shareable(result)
            n = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
            dice = (dxo.get_meta_prop(MetaKey.INITIAL_METRICS) or {}).get("val_dice")
        except Exception:
            n, dice = None, None
        self._round["accepted"][site] = n
        if dice is not None:
            self._round["val_dice"][site] = as_float(dice)

    def _before_aggregation(self, fl_ctx: FLContext) -> None:
        if self._round is None:
            return
        answered = set(self._round["accepted"]) | set(self._round["failed"])
        missing = sorted(set(self.record["expected_sites"]) - answered)
        self._round["missing"] = missing
        if missing:
            self.log_error(fl_ctx, f"round {self._round['round']}: no result from {missing} before the round closed "
                                   "(site down, or slower than the job's train_timeout)")
        accepted = len(self._round["accepted"])
        gaps = sorted(set(self.record["expected_sites"]) - set(self._round["accepted"]))
        if accepted < self.record["min_sites"]:
            self._stop(fl_ctx, f"round {self._round['round']}: {accepted} accepted contribution(s), fewer than "
                               f"min_sites={self.record['min_sites']}; {self._gap_text(gaps)}")
        elif gaps and self.on_missing_site == "stop":
            self._stop(fl_ctx, f"round {self._round['round']}: on_missing_site=stop and {self._gap_text(gaps)}")

    def _gap_text(self, gaps: list[str]) -> str:
        why = {**{s: "no result" for s in self._round["missing"]}, **self._round["failed"]}
        return "missing: " + "; ".join(f"{s} ({why.get(s, 'not accepted')})" for s in gaps) if gaps else "no site missing"

    def _after_aggregation(self, fl_ctx: FLContext) -> None:
        if self._round is None:
            return
        if self._round["status"] == "failed":  # stopped before aggregation: the workflow applies nothing
            self._round["updated_model"] = False
            return
        shareable = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
        reference = self._previous_global or {}
        try:
            dxo = from_shareable(shareable)
            problems = aggregate_problems(dxo.data, reference)
        except Exception as exc:
            dxo, problems = None, [f"aggregate unreadable ({type(exc).__name__}: {exc})"]
        if problems or dxo is None:
            self._round["updated_model"] = False
            self._round["aggregate"] = "; ".join(problems)
            self.log_error(fl_ctx, f"round {self._round['round']}: the aggregate is not used ({'; '.join(problems)}); "
                                   "the global model stays as it was")
            if dxo is not None:  # the workflow then leaves the global model as it was
                dxo.data = ({k: np.zeros_like(v) for k, v in reference.items()} if dxo.data_kind == DataKind.WEIGHT_DIFF
                            else dict(reference))
                dxo.update_shareable(shareable)
            return
        dxo.data = {k: np.asarray(v).astype(np.asarray(reference[k]).dtype, copy=False) for k, v in dxo.data.items()}
        dxo.update_shareable(shareable)
        self._round["updated_model"] = True

    def _streamed(self, fl_ctx: FLContext) -> None:
        """Keep each site's streamed training loss per round, for the progress line only."""
        data = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
        try:
            dxo = from_shareable(data)
            if dxo.data.get(TrackConst.TRACK_KEY) != TRAIN_LOSS_TAG:
                return
            site = data.get_peer_prop(ReservedKey.IDENTITY_NAME, None)
            step = dxo.data.get(TrackConst.GLOBAL_STEP_KEY)
            if site is None or step is None:
                return
            self._losses[(site, int(step))] = float(dxo.data[TrackConst.TRACK_VALUE])
        except Exception:
            return  # an unreadable stream only leaves a '-' in the progress line

    def _round_done(self, fl_ctx: FLContext) -> None:
        if self._round is None:
            return
        r = self._round
        r["seconds"] = round(time.monotonic() - self._round_start, 3)
        complete = r["updated_model"] and set(r["accepted"]) >= set(self.record["expected_sites"])
        r["status"] = "ok" if complete else ("degraded" if r["updated_model"] else "failed")
        self._write()
        sites = sorted(set(self.record.get("expected_sites") or []) | set(r["accepted"]) | set(r["failed"]))
        losses = {site: self._losses.pop((site, r["round"]), None) for site in sites}
        self._progress.info(progress_line(r, self.record.get("last_round"), sites, losses))

    def _stop(self, fl_ctx: FLContext, reason: str) -> None:
        if self._round is not None:
            self._round["status"] = "failed"
            answered = set(self._round["accepted"]) | set(self._round["failed"])
            self._round["missing"] = sorted(set(self.record["expected_sites"]) - answered)
        if not self.record.get("reason"):
            self.record["reason"] = reason
        self.log_error(fl_ctx, f"stopping the job: {reason}")
        self._write()
        self.system_panic(reason, fl_ctx)

    def _end(self, fl_ctx: FLContext) -> None:
        last = self.record.get("last_round")
        done = [r for r in self.record.get("rounds", []) if r.get("seconds") is not None]
        finished = last is not None and any(r["round"] == last for r in done)
        if self.record.get("reason") or not finished:
            self.record["status"] = FAILED
            if not self.record.get("reason"):
                self.record["reason"] = ("the job ended before its last round (aborted, or the server stopped)"
                                         if last is not None else "the job ended before training started")
        else:
            expected = set(self.record["expected_sites"])
            full = all(r.get("status") == "ok" and set(r.get("accepted", {})) >= expected for r in done)
            self.record["status"] = COMPLETED if full else COMPLETED_WITH_GAPS
        self.record["sites"] = site_summary(self.record)
        self.record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._write()
        summary = summarize(self.record)
        (self.log_info if self.record["status"] == COMPLETED else self.log_error)(fl_ctx, summary)

    def _write(self) -> None:
        if self._path is None:
            return
        self.record["sites"] = site_summary(self.record)
        tmp = self._path.with_suffix(".tmp")
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        tmp.replace(self._path)


