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

It also watches the sites while the job runs (``fedfms.flare.liveness``): each site's reports arrive as aux
messages; a site that died (the simulator saw its process exit, or FLARE dropped it) or said nothing for
``no_progress_timeout`` is ended for the round at once, named with the cause in the record and on the console, and
reported to FLARE as dead (``process_dead_client_report``), so the round and the later ones stop waiting for it.
A progress line per working site, at most every 30 s, goes to the console and the server's log.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from nvflare.apis.analytix import TrackConst
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from fedfms.flare.replies import FATAL_HEADER, REASON_HEADER
from fedfms.flare.liveness import (
    DEFAULT_NO_PROGRESS_S,
    DEFAULT_START_S,
    REPORT_KEY,
    SIMULATED,
    TOPIC,
    SiteLiveness,
    death_cause,
    kill_simulated_worker,
    oom_kills,
)
from fedfms.flare.update_check import aggregate_problems
from fedfms.run_record import (
    COMPLETED,
    COMPLETED_WITH_GAPS,
    FAILED,
    RUN_RECORD,
    RUNNING,
    as_float,
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
        no_progress_timeout: seconds without a report from a site (dead, frozen, unreachable) after which the
            round stops waiting for it (``fedfms.flare.liveness``).
        start_timeout: seconds from the job's start to a site's first report.
    """

    def __init__(self, expected_sites: list[str] | None = None, min_sites: int | None = None,
                 on_missing_site: str = "continue", train_task_name: str = AppConstants.TASK_TRAIN,
                 resume: dict | None = None, model_selector_id: str = "model_selector", persistor_id: str = "persistor",
                 no_progress_timeout: float = DEFAULT_NO_PROGRESS_S, start_timeout: float = DEFAULT_START_S):
        super().__init__()
        if not no_progress_timeout > 0 or not start_timeout > 0:
            raise ValueError(f"no_progress_timeout {no_progress_timeout!r} and start_timeout {start_timeout!r} must be "
                             "positive numbers of seconds")
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
        self.no_progress_timeout = no_progress_timeout
        self.start_timeout = start_timeout
        self.liveness: SiteLiveness | None = None
        self._engine = None
        self._controller = None  # the running workflow, told when a site is gone
        self._lock = threading.RLock()  # FLARE's threads and the liveness watch both change the record
        self._watching = threading.Event()
        self._sent_at: dict = {}  # (site, round) -> wall time its training task was handed out
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------------ events
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        try:
            with self._lock:
                self._handle(event_type, fl_ctx)
        except Exception as exc:  # the monitor must never be what breaks a run
            self.log_exception(fl_ctx, f"federation monitor: {type(exc).__name__}: {exc}")

    def _handle(self, event_type: str, fl_ctx: FLContext):
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
        elif event_type == EventType.AFTER_TASK_DATA_FILTER:
            self._task_sent(fl_ctx)
        elif event_type == EventType.FATAL_SYSTEM_ERROR:
            if not self.record.get("reason"):
                self.record["reason"] = str(fl_ctx.get_prop(FLContextKey.EVENT_DATA, "fatal error"))
        elif event_type == EventType.END_RUN:
            self._end(fl_ctx)
        elif event_type == ANALYTICS_EVENT:
            self._streamed(fl_ctx)

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
            "no_progress_timeout": self.no_progress_timeout,
            "gone": {},
            "peak_rss_gb": {},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        absent = sorted(set(expected) - set(connected))
        if absent:
            self.log_warning(fl_ctx, f"expected site(s) {absent} are not part of this job at start; "
                                     f"they will be recorded as missing from every round")
        self._write()
        self._start_watch(engine, sorted(set(expected) & set(connected)))

    # ------------------------------------------------------------------ liveness
    def _start_watch(self, engine, sites: list[str]) -> None:
        self._engine = engine
        self.liveness = SiteLiveness(sites, self.no_progress_timeout, self.start_timeout)
        engine.register_aux_message_handler(topic=TOPIC, message_handle_func=self._on_report)
        self._watching.set()
        self._watcher = threading.Thread(target=self._watch, name="fedfms-liveness", daemon=True)
        self._watcher.start()

    def _on_report(self, topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else None
        report = request.get(REPORT_KEY) if isinstance(request, dict) else None
        if site and isinstance(report, dict) and self.liveness is not None:
            if self.liveness.seen(site, report):
                self._back(site)
            peak = report.get("peak_rss_gb")
            if isinstance(peak, (int, float)):
                with self._lock:
                    peaks = self.record.setdefault("peak_rss_gb", {})
                    peaks[site] = max(peaks.get(site, 0.0), float(peak))
            self._transfers(site, report)
        return make_reply(ReturnCode.OK)

    def _transfers(self, site: str, report: dict) -> None:
        """Per training round and site: seconds and MB of the task's way to the site (the server's hand-out to the
        site's executor; same clock on one machine) and of the result's upload (measured at the site)."""
        with self._lock:
            rows = self.record.setdefault("transfers", {})
            r = report.get("task_round")
            sent = self._sent_at.get((site, r))
            if r is not None and sent is not None and isinstance(report.get("task_at"), (int, float)):
                row = rows.setdefault(f"{r}/{site}", {"round": r, "site": site})
                row.update(down_s=round(report["task_at"] - sent, 2), down_mb=report.get("task_mb"))
            u = report.get("upload_round")
            if u is not None and isinstance(report.get("upload_s"), (int, float)):
                row = rows.setdefault(f"{u}/{site}", {"round": u, "site": site})
                row.update(up_s=report["upload_s"], up_mb=report.get("upload_mb"))

    def _watch(self) -> None:
        while self._watching.is_set():
            try:
                self._check_sites()
            except Exception as exc:  # never let the watch die silently
                self._progress.warning(f"federation monitor: liveness check failed: {type(exc).__name__}: {exc}")
            time.sleep(1.0)

    def _check_sites(self) -> None:
        live = self.liveness
        turns, exits = SIMULATED.take()
        for site in turns:
            live.turn_started(site)
        for site, returncode in exits:
            cause = death_cause(returncode, live.report(site), SIMULATED.oom_at_start, oom_kills())
            if live.end(site, cause):
                self._gone(site, cause)
        for site, cause in live.overdue(exempt=SIMULATED.waiting()):
            kill_simulated_worker(site)  # a frozen simulated site would block the simulator for ever
            self._gone(site, cause)
        for line in live.lines():
            self._progress.info(line)

    def _gone(self, site: str, cause: str) -> None:
        """End ``site`` for this round (and, until it reports again, for the job): record, say, tell FLARE."""
        with self._lock:
            r = self._round
            if r is not None and r["status"] == RUNNING and site not in r["accepted"] and site not in r["failed"]:
                r.setdefault("ended", {})[site] = cause
            where = f"round {r['round']}" if r is not None else "before the first round"
            self.record.setdefault("gone", {})[site] = {"round": r["round"] if r is not None else None, "cause": cause}
            remaining = sorted(set(self.record["expected_sites"]) - set(self.record["gone"]))
            self._write()
        self._progress.error(f"{site} is gone ({where}): {cause}; the job goes on without it"
                             + (f" ({', '.join(remaining)} left)" if remaining else ""))
        with self._engine.new_context() as fl_ctx:
            controller = self._controller
            communicator = getattr(controller, "communicator", None)
            if communicator is not None and hasattr(communicator, "process_dead_client_report"):
                communicator.process_dead_client_report(site, fl_ctx)  # FLARE stops waiting for it after its grace
            with self._lock:
                if self.record.get("status") != RUNNING or self.record.get("reason") or self._training_finished():
                    return
                reason = None
                if len(remaining) < self.record["min_sites"]:
                    reason = (f"{site} is gone ({cause}); {len(remaining)} site(s) left, fewer than "
                              f"min_sites={self.record['min_sites']}")
                elif self.on_missing_site == "stop":
                    reason = f"on_missing_site=stop and {site} is gone ({cause})"
            if reason:
                self._stop(fl_ctx, reason)

    def _back(self, site: str) -> None:
        with self._lock:
            gone = self.record.get("gone", {}).pop(site, None)
            if gone is None:
                return
            at = self._round["round"] if self._round is not None else None
            self.record.setdefault("returned", {}).setdefault(site, []).append(at)
            self._write()
        self._progress.warning(f"{site} reports again (round {at}): it takes part from the next round it is asked")

    def _training_finished(self) -> bool:
        last = self.record.get("last_round")
        return last is not None and any(r["round"] == last and r.get("seconds") is not None for r in self.record["rounds"])

    def _task_sent(self, fl_ctx: FLContext) -> None:
        """A site that fetches a task is alive: its silence is counted from here."""
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else None
        if site and fl_ctx.get_prop(FLContextKey.TASK_NAME) == self.train_task_name and self._round is not None:
            self._sent_at[(site, self._round["round"])] = time.time()
        if site and self.liveness is not None and self.liveness.heard(site):
            threading.Thread(target=self._back, args=(site,), daemon=True).start()

    def _stop_watch(self) -> None:
        self._watching.clear()

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
            self.log_error(fl_ctx, f"site {site} is gone (FLARE deems it disconnected): the job goes on without it")
            self._write()
            cause = "FLARE dropped it: its job process ended, or the site stopped sending heartbeats"
            if self.liveness is not None and self.liveness.end(site, cause):
                threading.Thread(target=self._gone, args=(site, cause), daemon=True).start()

    def _workflow_started(self, fl_ctx: FLContext) -> None:
        # FLARE tells only the workflow running at the time that a site died; a later workflow (cross-site
        # evaluation) would wait its full timeouts for it. Tell the new one too.
        controller = fl_ctx.get_engine().get_component(fl_ctx.get_prop(FLContextKey.WORKFLOW))
        self._controller = controller
        if not self.dead_sites:
            return
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
        gone = {site: f"gone since round {g['round']}: {g['cause']}" for site, g in self.record.get("gone", {}).items()}
        self._round = {"round": r, "status": RUNNING, "accepted": {}, "failed": {}, "missing": [], "late": {},
                       "ended": gone, "val_dice": {}, "updated_model": None, "seconds": None}
        self.record["rounds"] = [x for x in self.record["rounds"] if x.get("round") != r] + [self._round]
        self._round_start = time.monotonic()
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        self._previous_global = dict(global_model[ModelLearnableKey.WEIGHTS]) if global_model else None
        self._write()  # the record shows the round in progress

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
        self._round.get("ended", {}).pop(site, None)  # given up on, yet its result came while the round was open
        if dice is not None:
            self._round["val_dice"][site] = as_float(dice)

    def _before_aggregation(self, fl_ctx: FLContext) -> None:
        if self._round is None:
            return
        answered = set(self._round["accepted"]) | set(self._round["failed"])
        missing = sorted(set(self.record["expected_sites"]) - answered)
        self._round["missing"] = missing
        if missing:
            ended = self._round.get("ended", {})
            self.log_error(fl_ctx, f"round {self._round['round']}: no result from " + "; ".join(
                f"{s} ({ended.get(s, 'the round closed first: its round_timeout passed')})" for s in missing))
        accepted = len(self._round["accepted"])
        gaps = sorted(set(self.record["expected_sites"]) - set(self._round["accepted"]))
        if accepted < self.record["min_sites"]:
            self._stop(fl_ctx, f"round {self._round['round']}: {accepted} accepted contribution(s), fewer than "
                               f"min_sites={self.record['min_sites']}; {self._gap_text(gaps)}")
        elif gaps and self.on_missing_site == "stop":
            self._stop(fl_ctx, f"round {self._round['round']}: on_missing_site=stop and {self._gap_text(gaps)}")

    def _gap_text(self, gaps: list[str]) -> str:
        ended = self._round.get("ended", {})
        why = {**{s: ended.get(s, "no result") for s in self._round["missing"]}, **self._round["failed"]}
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
        with self._lock:
            if self._round is not None:
                self._round["status"] = "failed"
                answered = set(self._round["accepted"]) | set(self._round["failed"])
                self._round["missing"] = sorted(set(self.record["expected_sites"]) - answered)
            if not self.record.get("reason"):
                self.record["reason"] = reason
            self._write()
        self.log_error(fl_ctx, f"stopping the job: {reason}")
        self.system_panic(reason, fl_ctx)

    def _end(self, fl_ctx: FLContext) -> None:
        self._stop_watch()
        # this process's peak (the server's job process; in the simulator also its site threads, not the sites)
        self.record["server_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
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


