"""FLARE's ``ScatterAndGather``, with each round's training task sent only to the sites that are still there.

Stock ``ScatterAndGather`` broadcasts every round to every site of the job and, once ``min_clients`` answered,
waits ``wait_time_after_min_received`` for the rest (up to ``train_timeout``). Here a round waits for every site it
asked (``min_responses=0``: all of them) as long as they work: it ends early only for sites FLARE deems
disconnected, which happens when the site is dead (FLARE's dead-job report, or the federation monitor's report of
a site that died or stopped reporting, ``fedfms.flare.liveness``). A site FLARE already deems disconnected when a
round starts is not asked at all, so a dead site costs the later rounds nothing (stock FLARE waits
``dead_client_check_lead_time`` for it every round). ``train_timeout`` (the job's ``round_timeout``; 0: none) stays
as the outer bound. Everything else (aggregation, persistence, events) is FLARE's own.
"""

from __future__ import annotations

from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather


class LiveScatterAndGather(ScatterAndGather):
    def broadcast_and_wait(self, task, fl_ctx, targets=None, min_responses=1, wait_time_after_min_received=0,
                           abort_signal=None):
        if task.name != self.train_task_name or targets is not None:
            return super().broadcast_and_wait(task, fl_ctx, targets, min_responses, wait_time_after_min_received,
                                              abort_signal)
        sites = [c.name for c in self._engine.get_clients()]
        live = [s for s in sites if not self.get_client_disconnect_time(s)]
        if live and len(live) < len(sites):
            gone = sorted(set(sites) - set(live))
            self.log_warning(fl_ctx, f"round {self._current_round}: not asking {gone}: FLARE deems them disconnected")
            self._current_num_targets = len(live)
        # min_responses=0: the task ends when every asked site answered (or is gone, or train_timeout passed)
        return super().broadcast_and_wait(task, fl_ctx, live or None, 0, wait_time_after_min_received, abort_signal)
