"""A site's reports to the server while its job runs (what they hold and how the server reads them:
``fedfms.flare.liveness``), and the same progress line in the site's own log every ~30 s.

Reports travel as FLARE aux messages to the server (``send_aux_request``, fire and forget, the way FLARE's own
job heartbeat travels), so they work alike in the simulator, in POC and in production. A thread sends one every
:data:`~fedfms.flare.liveness.REPORT_S` seconds from the job's start to its end, also while a training step runs
for minutes; a phase change or a finished batch sends one at once (at most one a second).
"""

from __future__ import annotations

import logging
import resource
import threading
import time

import psutil
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.fuel.f3.cellnet.fqcn import FQCN

from fedfms.flare.liveness import LINE_EVERY_S, REPORT_KEY, REPORT_S, TOPIC, progress_line

# the site's log (log.txt), not its console: the server prints the same lines where the user looks
SITE_LOGGER = "fedfms.flare.site_progress"
MIN_SEND_GAP_S = 1.0
ACK_TIMEOUT_S = 5.0  # the first reports wait this long for the server's reply
FIRST_REPORT_RETRY_S = 2.0  # and are repeated this often until one is acknowledged


def memory_figures() -> dict:
    """This process's resident memory now (with its children: DDP ranks, data loader workers), its peak so far
    (the kernel's ``ru_maxrss``) and the host's free memory, in GB."""
    proc = psutil.Process()
    rss = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            rss += child.memory_info().rss
        except psutil.Error:
            pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    return {"rss_gb": round(rss / 1e9, 3), "peak_rss_gb": round(max(peak, rss) / 1e9, 3),
            "host_free_gb": round(psutil.virtual_memory().available / 1e9, 3)}


class ProgressReporter:
    """Reports of one site. ``engine``: the site's FLARE engine; ``clock``/``send`` are injectable for tests."""

    def __init__(self, engine, site: str, interval: float = REPORT_S, line_every: float = LINE_EVERY_S,
                 clock=time.monotonic, send=None):
        self.engine, self.site = engine, site
        self.interval, self.line_every = interval, line_every
        self.clock = clock
        self._send_fn = send or self._send_aux
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = {"phase": "setup", "round": None, "done": None, "total": None, "s_per_sample": None}
        self._phase_started = clock()
        self._last_sample = None  # clock time of the last finished batch
        self._step_s_max = None  # longest step of this job so far (seconds)
        self._last_sent = 0.0
        self._last_line = 0.0
        self._seq = 0
        self._acknowledged = send is not None  # an injected sender (tests) needs no acknowledgement
        self.log = logging.getLogger(SITE_LOGGER)

    # ------------------------------------------------------------------ what the executor calls
    def start(self) -> None:
        self.report(force=True)
        self._thread = threading.Thread(target=self._run, name=f"fedfms-progress-{self.site}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def phase(self, phase: str, round_: int | None = None, total: int | None = None) -> None:
        """A new phase (``idle``, ``validate``, ``train``, ``send``); reported at once."""
        now = self.clock()
        with self._lock:
            if round_ is not None:
                self._state["round"] = int(round_)
            self._state.update(phase=phase, done=0 if total else None, total=total, s_per_sample=None)
            self._phase_started = now
            self._last_sample = None
        self.report(force=True)

    def transfer(self, **figures) -> None:
        """What the last transfers took, measured here (``task_at``: wall time the task reached the executor,
        ``task_mb``; ``upload_s``/``upload_mb``: the last result's upload); sent with the following reports."""
        with self._lock:
            self._state.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()})

    def samples(self, phase: str, done: int, total: int) -> None:
        """``done`` of ``total`` samples of the current phase are finished (the trainer's callback)."""
        now = self.clock()
        with self._lock:
            if self._state["phase"] != phase:
                self._state.update(phase=phase, s_per_sample=None)
                self._phase_started, self._last_sample = now, None
            step = now - (self._last_sample if self._last_sample is not None else self._phase_started)
            self._step_s_max = step if self._step_s_max is None else max(self._step_s_max, step)
            self._last_sample = now
            self._state.update(done=int(done), total=int(total),
                               s_per_sample=(now - self._phase_started) / done if done else None)
        self.report()

    # ------------------------------------------------------------------ reports
    def payload(self) -> dict:
        now = self.clock()
        with self._lock:
            state = dict(self._state)
            since = now - (self._last_sample if self._last_sample is not None else self._phase_started)
            self._seq += 1
            state.update(seq=self._seq, pid=self._pid(),
                         step_s_max=round(self._step_s_max, 3) if self._step_s_max is not None else None,
                         since_sample_s=round(since, 1) if state["phase"] in ("validate", "train") else None)
        if state["s_per_sample"] is not None:
            state["s_per_sample"] = round(state["s_per_sample"], 3)
        try:
            state.update(memory_figures())
        except Exception:
            pass
        return state

    @staticmethod
    def _pid() -> int:
        import os

        return os.getpid()

    def report(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_sent < MIN_SEND_GAP_S:
            return
        self._last_sent = now
        payload = self.payload()
        try:
            self._send_fn(payload)
        except Exception as exc:  # a lost report only makes the next one count
            self.log.debug("progress report not sent: %s", exc)
        if now - self._last_line >= self.line_every:
            line = progress_line(self.site, payload)
            if line:
                self._last_line = now
                self.log.info(line)

    def _send_aux(self, payload: dict) -> bool:
        """Fire and forget once the server has acknowledged a report; until then (the job's connection may not be
        up yet while the job starts) wait for the server's reply, so that the first report is known to arrive."""
        request = Shareable()
        request[REPORT_KEY] = payload
        with self.engine.new_context() as fl_ctx:
            replies = self.engine.send_aux_request(targets=[FQCN.ROOT_SERVER], topic=TOPIC, request=request,
                                                   timeout=0.0 if self._acknowledged else ACK_TIMEOUT_S, fl_ctx=fl_ctx,
                                                   optional=True)
        if not self._acknowledged:
            self._acknowledged = any(isinstance(r, Shareable) and r.get_return_code() == ReturnCode.OK
                                     for r in (replies or {}).values())
        return self._acknowledged

    def _run(self) -> None:
        while not self._stop.wait(self.interval if self._acknowledged else FIRST_REPORT_RETRY_S):
            self.report(force=True)
