"""A round waits exactly as long as its sites work: the server's view of each site from its own reports
(fedfms.flare.liveness), and, in FLARE's simulator, a site killed (SIGKILL) or frozen (SIGSTOP) mid-round is
named with its cause and released within the bound while the others go on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedfms.data.synthetic import make_disc_site
from fedfms.flare.fed_job import render_job
from fedfms.flare.liveness import SiteLiveness, death_cause, describe_exit, progress_line
from fedfms.flare.simulate import server_job_dir


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_site_silent_for_the_bound_is_ended_with_where_it_was_last_heard():
    clock = Clock()
    live = SiteLiveness(["a", "b"], no_progress_timeout=120, start_timeout=600, clock=clock)
    live.seen("a", {"phase": "train", "round": 2, "done": 96, "total": 261})
    live.seen("b", {"phase": "idle"})
    clock.now += 119
    live.seen("b", {"phase": "idle"})
    assert live.overdue() == []
    clock.now += 2
    [(site, cause)] = live.overdue()
    assert site == "a" and "no report from it for 2.0 min" in cause and "round 2, train 96/261 samples" in cause
    assert live.ended("a") == cause and live.overdue() == []  # ended once
    assert live.seen("a", {"phase": "idle"}) is True and live.ended("a") is None  # back


def test_a_site_is_given_the_start_time_for_its_first_report_and_a_simulator_turn_restarts_it():
    clock = Clock()
    live = SiteLiveness(["a", "b"], no_progress_timeout=120, start_timeout=600, clock=clock)
    clock.now += 599
    assert live.overdue() == []
    clock.now += 2
    assert {s for s, _ in live.overdue()} == {"a", "b"}
    live = SiteLiveness(["a"], no_progress_timeout=120, start_timeout=600, clock=clock)
    live.seen("a", {"phase": "idle"})
    clock.now += 100
    live.turn_started("a")  # a fresh process for its turn: it may take the start time again
    clock.now += 500
    assert live.overdue() == []
    assert live.overdue(exempt={"a"}) == []


def test_a_reporting_site_that_finishes_no_sample_for_ten_of_its_own_steps_is_stalled():
    clock = Clock()
    live = SiteLiveness(["a"], no_progress_timeout=120, clock=clock)
    live.seen("a", {"phase": "train", "done": 6, "total": 12, "step_s_max": 30.0, "since_sample_s": 250.0})
    assert live.overdue() == []  # 250 s < 10 x 30 s
    live.seen("a", {"phase": "train", "done": 6, "total": 12, "step_s_max": 30.0, "since_sample_s": 295.0})
    clock.now += 10  # its next report is due: the time since it spoke counts too
    [(_, cause)] = live.overdue()
    assert "finished no sample for 5.1 min" in cause and "10x its own longest step, 30 s" in cause
    # a site that stopped reporting is named by the silence rule, not as stalled
    live = SiteLiveness(["a"], no_progress_timeout=120, clock=clock)
    live.seen("a", {"phase": "train", "done": 6, "total": 12, "step_s_max": 1.0, "since_sample_s": 0.5})
    clock.now += 121
    [(_, cause)] = live.overdue()
    assert cause.startswith("no report from it for 2.0 min")
    # a slow site (its steps take 20 min) is never stalled by someone else's idea of speed
    live = SiteLiveness(["a"], no_progress_timeout=120, clock=clock)
    live.seen("a", {"phase": "train", "done": 6, "total": 12, "step_s_max": 1200.0, "since_sample_s": 3000.0})
    assert live.overdue() == []


def test_progress_lines_at_most_every_30_s_per_working_site():
    clock = Clock()
    live = SiteLiveness(["a", "b"], clock=clock)
    live.seen("a", {"phase": "train", "round": 0, "done": 96, "total": 261, "s_per_sample": 0.9})
    live.seen("b", {"phase": "idle"})
    assert live.lines() == ["a 96/261 samples, 0.9 s/sample, ~2.5 min left"]
    clock.now += 29
    live.seen("a", {"phase": "train", "round": 0, "done": 102, "total": 261, "s_per_sample": 0.9})
    assert live.lines() == []
    clock.now += 2
    assert live.lines() == ["a 102/261 samples, 0.9 s/sample, ~2.4 min left"]
    clock.now += 31
    assert live.lines() == []  # nothing new from it: no line repeating an old report
    assert progress_line("a", {"phase": "validate", "round": 1, "done": 1, "total": 2}) == "a validating 1/2 samples"
    assert progress_line("a", {"phase": "train", "done": 0, "total": 12}).endswith("(timing after the first step)")


def test_a_death_says_why_when_it_is_known():
    assert describe_exit(-9) == "was killed by SIGKILL (signal 9)" and describe_exit(1) == "exited with code 1"
    report = {"rss_gb": 7.8, "host_free_gb": 0.4}
    assert death_cause(-9, report, 0, 1) == ("its process was killed by SIGKILL (signal 9): the kernel's out-of-memory "
                                             "killer ended it (it held 7.8 GB; 0.4 GB free on its host at its last report)")
    assert "probably out of memory" in death_cause(-9, report)
    assert death_cause(-9, {"rss_gb": 2.0, "host_free_gb": 12.0}, 3, 3).startswith("its process was killed by SIGKILL (signal 9) (")


def test_a_site_reports_its_phase_samples_speed_and_memory_and_logs_a_line_every_30_s(caplog):
    from fedfms.flare.site_progress import SITE_LOGGER, ProgressReporter

    clock, sent = Clock(), []
    reporter = ProgressReporter(None, "site-1", clock=clock, send=sent.append)
    reporter.phase("train", round_=2)
    assert sent[-1]["phase"] == "train" and sent[-1]["round"] == 2 and sent[-1]["rss_gb"] > 0
    with caplog.at_level("INFO", logger=SITE_LOGGER):
        for done in (6, 12, 18):
            clock.now += 5.4  # 0.9 s per sample, 6 per step
            reporter.samples("train", done, 261)
        last = sent[-1]
        assert (last["done"], last["total"], last["s_per_sample"], last["step_s_max"]) == (18, 261, 0.9, 5.4)
        assert [r.getMessage() for r in caplog.records] == ["site-1 6/261 samples, 0.9 s/sample, ~3.8 min left"]
        for done in range(24, 43, 6):  # the next line 30 s after the first, at the same pace
            clock.now += 5.4
            reporter.samples("train", done, 261)
    assert [r.getMessage() for r in caplog.records][1:] == ["site-1 42/261 samples, 0.9 s/sample, ~3.3 min left"]


def test_jobs_wait_on_progress_not_on_a_guessed_speed():
    server = render_job("fedmsa", samples_per_site=2000)["app/config/config_fed_server.json"]
    workflows = {w["id"]: w for w in server["workflows"]}
    assert workflows["scatter_and_gather"]["path"] == "fedfms.flare.scatter_gather.LiveScatterAndGather"
    assert workflows["scatter_and_gather"]["args"]["train_timeout"] == 0  # no bound but the sites' liveness
    assert workflows["cross_site_validate"]["args"]["validation_timeout"] == 0
    bounded = render_job("fedmsa", round_timeout=5400, no_progress_timeout=300)["app/config/config_fed_server.json"]
    assert {w["id"]: w for w in bounded["workflows"]}["scatter_and_gather"]["args"]["train_timeout"] == 5400
    monitor = next(c for c in bounded["components"] if c["id"] == "federation_monitor")
    assert monitor["args"]["no_progress_timeout"] == 300


# ---------------------------------------------------------------------------------------------------- simulator
SITES = ["site-1", "site-2", "site-3"]


def _sites(root: Path) -> Path:
    for i, site in enumerate(SITES):
        make_disc_site(root / site, site=site, num_volumes=2, slices_per_volume=3, seed=i)
    return root


def _worker(workspace: Path, site: str) -> psutil.Process | None:
    needle = str(workspace / site)
    for proc in psutil.process_iter(["cmdline"]):
        # a forked site's title (fedfms.flare.site_forkserver) may read as one string: its words are the command's
        cmd = " ".join(proc.info.get("cmdline") or []).split()
        if "nvflare.private.fed.app.simulator.simulator_worker" in cmd and needle in cmd:
            return proc
    return None


def _record(workspace: Path) -> dict | None:
    try:
        return json.loads((server_job_dir(workspace) / "fedfms_run.json").read_text())
    except (OSError, ValueError):
        return None


def _start(tmp_path: Path, rounds: int, victim: str, **settings) -> tuple[subprocess.Popen, Path]:
    """The victim's results leave 20 s after its training (a slow site), so it is surely mid-round a few seconds
    after a round starts, whatever the load of the machine."""
    from test_simulator import write_job as write_test_job

    data = _sites(tmp_path / "data")
    slow = [{"path": "sim_support.SlowFilter", "args": {"seconds": 20}}]
    job = write_test_job(tmp_path / "job", "fedmsa_tiny", {
        "app": {"sites": [s for s in SITES if s != victim]},
        "app_slow": {"sites": [victim], "filters": slow}}, num_rounds=rounds, **settings)
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "fedfms.cli", "simulate", str(job), "--workspace", str(ws), "--clients", ",".join(SITES),
           "--data-root", str(data)]
    # the console to a file: a site process left behind would hold a pipe open
    with open(tmp_path / "console.txt", "w") as console:
        proc = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.console = tmp_path / "console.txt"
    return proc, ws


def _training(sim: subprocess.Popen, ws: Path, site: str, round_: int, timeout: float) -> psutil.Process:
    """The site's process a few seconds into ``round_`` (inside its local training)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sim.poll() is not None:
            raise AssertionError(f"the simulation ended ({sim.returncode}) before round {round_}:\n"
                                 f"{sim.console.read_text()[-4000:]}")
        record = _record(ws)
        if record and any(r["round"] == round_ and r["seconds"] is None for r in record["rounds"]):
            proc = _worker(ws, site)
            if proc is not None:
                # forked from the simulation's fork server (fedfms.flare.site_forkserver), not started plainly
                assert "fedfms.flare.site_forkserver" in " ".join(proc.parent().cmdline())
                time.sleep(3.0)
                return proc
        time.sleep(0.3)
    raise AssertionError(f"round {round_} never started within {timeout:.0f} s")


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the simulation did not end within {timeout:.0f} s:\n{proc.console.read_text()[-4000:]}") from None
    return proc.console.read_text()


@pytest.mark.integration
def test_a_simulated_site_killed_mid_round_is_named_released_and_costs_the_later_rounds_nothing(tmp_path):
    proc, ws = _start(tmp_path, rounds=3, victim="site-3")
    victim = None
    try:
        victim = _training(proc, ws, "site-3", 1, timeout=600)
        killed_at = time.time()
        victim.send_signal(signal.SIGKILL)
        out = _finish(proc, timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, out[-4000:]  # every round ran; site-3 missed some: not a plain success
    record = _record(ws)
    gone = record["gone"]["site-3"]
    assert gone["round"] == 1 and "killed by SIGKILL (signal 9)" in gone["cause"]
    assert "site-3 is gone (round 1): its process was killed by SIGKILL" in out  # on the console, where the user looks
    rounds = {r["round"]: r for r in record["rounds"]}
    assert set(rounds[1]["accepted"]) == {"site-1", "site-2"} and "SIGKILL" in rounds[1]["ended"]["site-3"]
    assert set(rounds[2]["accepted"]) == {"site-1", "site-2"}
    assert "SIGKILL" in record["sites"]["site-3"]["missed"]["1"]
    assert record["sites"]["site-3"]["contributed"] == [0]
    # released within FLARE's 15 s grace of the death, not after a timeout; later rounds do not ask it at all
    assert "not asking ['site-3']" in (ws / "server" / "log.txt").read_text(errors="replace")
    after = time.time() - killed_at
    print(f"site-3 killed in round 1: the run ended {after:.0f} s later; rounds "
          f"{[round(rounds[r]['seconds'], 1) for r in sorted(rounds)]} s")
    assert after < 240, after


@pytest.mark.integration
def test_a_simulated_site_frozen_mid_round_is_released_after_the_no_progress_bound(tmp_path):
    bound = 20
    proc, ws = _start(tmp_path, rounds=2, victim="site-2", no_progress_timeout=bound)
    victim = None
    try:
        victim = _training(proc, ws, "site-2", 1, timeout=600)
        frozen_at = time.time()
        victim.send_signal(signal.SIGSTOP)
        out = _finish(proc, timeout=600)
        ended = time.time()
        stopped = victim.is_running() and victim.status() == psutil.STATUS_STOPPED
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if victim is not None and victim.is_running():  # (FLARE starts site processes in their own session)
            victim.kill()
    assert not stopped, "the frozen site process was left behind"
    assert proc.returncode == 3, out[-4000:]
    record = _record(ws)
    assert "no report from it for" in record["gone"]["site-2"]["cause"]
    assert "site-2 is gone (round 1): no report from it" in out
    assert set(record["rounds"][1]["accepted"]) == {"site-1", "site-3"} and "site-2" in record["rounds"][0]["accepted"]
    print(f"site-2 frozen in round 1 (bound {bound} s): the run ended {ended - frozen_at:.0f} s later")
    assert ended - frozen_at < bound + 120
