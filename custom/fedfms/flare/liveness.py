"""Is each site alive and working? What the server knows from the sites' own reports, and nothing guessed.

Every site's executor reports (``fedfms.flare.site_progress``) through a FLARE aux message on :data:`TOPIC`, at
least every :data:`REPORT_S` seconds from the moment its job process starts (a thread, so a step that takes
minutes still reports) and at once when a phase starts or a sample is done: the round, the phase (``setup``,
``idle``, ``validate``, ``train``, ``send``), samples done of the round's total, its own seconds per sample, how
long since its last finished sample, its longest step so far, its memory and the host's free memory.

The server (:class:`fedfms.flare.monitor.FederationMonitor`) keeps one :class:`SiteLiveness` and ends a site for
the round at once when

- its process is known to have died (the simulator saw the site's process exit: exit code or signal; FLARE
  reports a site dropped: its job process is gone, or the site stopped sending heartbeats), or
- nothing came from it for ``no_progress_timeout`` seconds (default :data:`DEFAULT_NO_PROGRESS_S`; a frozen or
  unreachable process sends nothing), or ``start_timeout`` before its first report, or
- it reports but finished no sample for ``max(no_progress_timeout, STALL_FACTOR x its own longest step)``.

Nothing here assumes a speed: a slow site that reports is waited for as long as it works. This module is plain
Python (psutil only): the FLARE glue is in the monitor and the executor.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TOPIC = "fedfms.site_progress"  # the aux-message topic of the sites' reports
REPORT_KEY = "fedfms_progress"  # the report inside the aux message (a Shareable, i.e. a dict)
DEFAULT_NO_PROGRESS_S = 120.0  # a live site reports every REPORT_S; this many seconds of silence end it
DEFAULT_START_S = 600.0  # from the job's start (or its simulator turn) to a site's first report
REPORT_S = 10.0  # how often a site reports while its job runs
LINE_EVERY_S = 30.0  # at most one progress line per site this often
STALL_FACTOR = 10  # a reporting site is stalled after this many times its own longest step without a sample
PHASES = ("setup", "idle", "validate", "train", "send")
WORKING = ("validate", "train")


def format_seconds(seconds: float) -> str:
    """``40 s``, ``2.5 min``, ``1.2 h``."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe_exit(returncode: int) -> str:
    """``was killed by SIGKILL (signal 9)`` or ``exited with code 1``, from a process's return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (signal {-returncode})"
    return f"exited with code {returncode}"


def oom_kills() -> int | None:
    """How often the kernel's out-of-memory killer has acted in this process's memory cgroup (v2
    ``memory.events`` or v1 ``memory.oom_control``); None where the kernel does not say."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                candidates.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events")
            elif "memory" in controllers.split(","):
                candidates.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control")
    except (OSError, ValueError):
        pass
    candidates += [Path("/sys/fs/cgroup/memory.events"), Path("/sys/fs/cgroup/memory/memory.oom_control")]
    for path in candidates:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def memory_note(report: dict | None) -> str:
    """``it held 7.8 GB; 0.4 GB free on its host`` from a site's last report ('' without one)."""
    if not report or report.get("rss_gb") is None:
        return ""
    note = f"it held {report['rss_gb']:.1f} GB"
    if report.get("host_free_gb") is not None:
        note += f"; {report['host_free_gb']:.1f} GB free on its host"
    return note + " at its last report"


def death_cause(returncode: int, report: dict | None = None, oom_before: int | None = None,
                oom_after: int | None = None) -> str:
    """Why a site's process ended, as far as it is known: exit code or signal, whether the kernel's
    out-of-memory killer acted meanwhile, and the memory it held at its last report."""
    cause = f"its process {describe_exit(returncode)}"
    if oom_before is not None and oom_after is not None and oom_after > oom_before:
        cause += ": the kernel's out-of-memory killer ended it"
    elif returncode == -signal.SIGKILL and report and report.get("host_free_gb") is not None \
            and report["host_free_gb"] < 1.0:
        cause += ": probably out of memory"
    note = memory_note(report)
    return cause + (f" ({note})" if note else "")


def progress_line(site: str, report: dict) -> str | None:
    """``site-1 96/261 samples, 0.9 s/sample, ~2.5 min left`` for a training site (``validating 1/2 samples``
    while it scores the global model it received); None in the other phases."""
    phase, done, total = report.get("phase"), report.get("done"), report.get("total")
    if phase not in WORKING or done is None or not total:
        return None
    per = report.get("s_per_sample")
    if phase == "validate":
        return f"{site} validating {done}/{total} samples"
    head = f"{site} {done}/{total} samples"
    if not per:
        return head + " (timing after the first step)"
    left = max(total - done, 0) * per
    return f"{head}, {per:.2g} s/sample, ~{format_seconds(left)} left" if per < 1 else \
        f"{head}, {per:.1f} s/sample, ~{format_seconds(left)} left"


@dataclass
class _Site:
    last_seen: float | None = None  # clock time of its last report
    report: dict = field(default_factory=dict)
    ended: str | None = None  # why the server gave up on it (until it reports again)
    turn_started: float | None = None  # simulator: when its current turn began
    last_line: float = 0.0
    fresh: bool = False  # a report arrived since its last progress line


class SiteLiveness:
    """The server's view of each expected site. Thread-safe; ``clock`` is injectable for tests.

    Args:
        sites: the sites expected to report.
        no_progress_timeout: seconds without any report after which a site is ended.
        start_timeout: seconds from the start (or the site's simulator turn) to its first report.
        line_every: seconds between two progress lines of one site.
    """

    def __init__(self, sites, no_progress_timeout: float = DEFAULT_NO_PROGRESS_S, start_timeout: float = DEFAULT_START_S,
                 line_every: float = LINE_EVERY_S, clock=time.monotonic):
        self.no_progress_timeout = float(no_progress_timeout)
        self.start_timeout = max(float(start_timeout), self.no_progress_timeout)
        self.line_every = line_every
        self.clock = clock
        self.started = clock()
        self._sites = {s: _Site() for s in sites}
        self._lock = threading.Lock()

    def _site(self, site: str) -> _Site:
        return self._sites.setdefault(site, _Site())

    def seen(self, site: str, report: dict) -> bool:
        """A report arrived. True when the site had been ended and is back."""
        with self._lock:
            s = self._site(site)
            back = s.ended is not None
            s.last_seen, s.report, s.ended, s.fresh = self.clock(), dict(report), None, True
            return back

    def heard(self, site: str) -> bool:
        """Proof of life without a report (the site fetched a task). True when the site had been ended and is back."""
        with self._lock:
            s = self._site(site)
            back = s.ended is not None
            s.last_seen, s.ended = self.clock(), None
            return back

    def turn_started(self, site: str) -> None:
        """Simulator: the site's process (re)starts for its turn; its first report may take the start time."""
        with self._lock:
            self._site(site).turn_started = self.clock()

    def end(self, site: str, cause: str) -> bool:
        """The site is known to be gone. True when this is news (it was not ended already)."""
        with self._lock:
            s = self._site(site)
            if s.ended is not None:
                return False
            s.ended = cause
            return True

    def ended(self, site: str) -> str | None:
        with self._lock:
            return self._site(site).ended

    def report(self, site: str) -> dict:
        with self._lock:
            return dict(self._site(site).report)

    def overdue(self, exempt=()) -> list[tuple[str, str]]:
        """Sites (not ``exempt``, not ended yet) that said nothing for too long, or report without progress:
        each is ended here and returned with its cause."""
        now = self.clock()
        found = []
        with self._lock:
            for name, s in self._sites.items():
                if s.ended is not None or name in exempt:
                    continue
                cause = self._silence(s, now) or self._stall(s, now)
                if cause:
                    s.ended = cause
                    found.append((name, cause))
        return found

    def _silence(self, s: _Site, now: float) -> str | None:
        since = max(x for x in (s.last_seen, s.turn_started, self.started) if x is not None)
        reported_since = s.last_seen is not None and s.last_seen >= since
        limit = self.no_progress_timeout if reported_since else self.start_timeout
        if now - since <= limit:
            return None
        if not reported_since:
            return f"no report from it {format_seconds(now - since)} after it was due to start (process not running?)"
        where = _where(s.report)
        return (f"no report from it for {format_seconds(now - since)} (process dead, frozen or unreachable; "
                f"last heard {where})")

    def _stall(self, s: _Site, now: float) -> str | None:
        r = s.report
        if r.get("phase") not in WORKING or r.get("since_sample_s") is None or not r.get("step_s_max"):
            return None
        if s.last_seen is None or now - s.last_seen > 3 * REPORT_S:
            return None  # not reporting either: the silence rule names it
        waited = r["since_sample_s"] + (now - s.last_seen)
        limit = max(self.no_progress_timeout, STALL_FACTOR * r["step_s_max"])
        if waited <= limit:
            return None
        return (f"it reports but finished no sample for {format_seconds(waited)} ({STALL_FACTOR}x its own longest "
                f"step, {format_seconds(r['step_s_max'])}; {_where(r)})")

    def lines(self) -> list[str]:
        """Progress lines due now: at most one per working site every ``line_every`` seconds, each from a report
        that arrived since the site's previous line."""
        now = self.clock()
        out = []
        with self._lock:
            for name, s in sorted(self._sites.items()):
                if s.ended is not None or not s.fresh or now - s.last_line < self.line_every:
                    continue
                line = progress_line(name, s.report)
                if line:
                    s.last_line, s.fresh = now, False
                    out.append(line)
        return out


def _where(report: dict) -> str:
    if not report:
        return "never"
    phase = report.get("phase", "?")
    at = f"in round {report['round']}, " if report.get("round") is not None else ""
    if phase in WORKING and report.get("total"):
        return f"{at}{phase} {report.get('done', 0)}/{report['total']} samples"
    return f"{at}{phase}"


class SimulatedSites:
    """What FLARE's simulator knows about its site processes, told by ``fedfms.flare.simulate``'s runner (which
    starts them) to the server's monitor in the same process: when a site's turn starts (each turn may start a
    fresh process) and when its process exits abnormally (exit code or signal). Empty outside the simulator."""

    def __init__(self):
        self._lock = threading.Lock()
        self.active = False
        self._running: dict[str, int] = {}  # site -> turns in progress
        self._turns: list[str] = []
        self._exits: list[tuple[str, int]] = []
        self.oom_at_start = oom_kills()

    def activate(self) -> None:
        with self._lock:
            self.active = True
            self._running.clear()
            self._turns.clear()
            self._exits.clear()
            self.oom_at_start = oom_kills()

    def turn_started(self, site: str) -> None:
        with self._lock:
            self._running[site] = self._running.get(site, 0) + 1
            self._turns.append(site)

    def turn_ended(self, site: str) -> None:
        with self._lock:
            self._running[site] = max(0, self._running.get(site, 0) - 1)

    def exited(self, site: str, returncode: int) -> None:
        with self._lock:
            self._exits.append((site, returncode))

    def waiting(self) -> set[str]:
        """Sites whose process is not running now (waiting for a simulator thread): exempt from the silence
        rule until their turn starts. Only meaningful while the simulator is active."""
        with self._lock:
            return {s for s, n in self._running.items() if n == 0} if self.active else set()

    def take(self) -> tuple[list[str], list[tuple[str, int]]]:
        """(turns started, abnormal exits) since the last call."""
        with self._lock:
            turns, exits = self._turns[:], self._exits[:]
            self._turns.clear()
            self._exits.clear()
            return turns, exits


SIMULATED = SimulatedSites()  # the simulator's runner and the server's monitor share one process


def kill_simulated_worker(site: str) -> bool:
    """SIGKILL a simulated site's process that the server gave up on (frozen: FLARE's simulator would wait for it
    for ever). Only a process of this simulator: a child of this process running that site's worker, or one the fork
    server forked for it."""
    if not SIMULATED.active:
        return False
    try:
        import psutil

        killed = False
        for proc in psutil.Process().children():
            cmd = proc.cmdline()
            if "nvflare.private.fed.app.simulator.simulator_worker" in cmd and "--client" in cmd \
                    and cmd[cmd.index("--client") + 1:cmd.index("--client") + 2] == [site]:
                proc.send_signal(signal.SIGKILL)  # ends a stopped (SIGSTOP) process too
                killed = True
        from fedfms.flare.site_forkserver import forked_site_processes

        for forked in forked_site_processes(site):  # forked by the fork server (fedfms.flare.site_forkserver)
            forked.kill()
            killed = True
        return killed
    except Exception:
        return False
