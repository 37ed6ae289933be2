"""Simulated sites forked from a fork server that has already imported what a site imports
(fedfms/flare/site_forkserver.py): a forked process must be what ``python -m <module>`` would have been (arguments,
environment, working directory, import path, standard streams, session, title, exit code), report its end like
``subprocess.Popen`` and never run a job's own code shadowed by what the fork server imported.

These use a fork server that imports only ``json`` (the real one imports torch, FLARE and MONAI: 4-5 CPU-s); the
simulations in tests/flare use the real one, and test_liveness checks that their sites are its forks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fedfms.flare import site_forkserver
from fedfms.flare.site_forkserver import WORKER_MODULE, ForkedProcess, ForkServer, site_popen

PROBE = textwrap.dedent("""
    import json, os, sys, time
    import psutil
    me = psutil.Process()
    report = {"name": __name__, "argv": sys.argv[1:], "cwd": os.getcwd(), "flag": os.environ.get("PROBE_FLAG"),
              "path": sys.path[:2], "session_leader": os.getsid(0) == os.getpid(), "cmdline": " ".join(me.cmdline()).split()[1:],
              "json_loaded_first": "json" in sys.modules}
    with open(os.environ["PROBE_OUT"], "w") as out:
        json.dump(report, out)
    print("hello from", sys.argv[1:], flush=True)
    if os.environ.get("PROBE_SLEEP"):
        time.sleep(float(os.environ["PROBE_SLEEP"]))
    sys.exit(int(os.environ.get("PROBE_RC", "0")))
""")


@pytest.fixture(scope="module")
def server():
    server = ForkServer(preload=("json",))
    yield server
    server.close()


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "probe.py").write_text(PROBE)
    (tmp_path / "cwd").mkdir()
    return folder


def _env(probe_dir: Path, out: Path, **extra) -> dict:
    path = os.pathsep.join([str(probe_dir), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "PROBE_FLAG": "from-the-request", "PROBE_OUT": str(out),
            **{k: str(v) for k, v in extra.items()}}


def test_a_forked_module_is_what_python_dash_m_would_have_been(server, probe_dir, tmp_path, capfd):
    argv = [sys.executable, "-m", "probe", "--client", "site-1"]
    cwd = tmp_path / "cwd"
    forked = ForkedProcess(server.address, argv, _env(probe_dir, tmp_path / "forked.json", PROBE_RC=3), str(cwd))
    assert forked.wait(timeout=60) == 3
    plain = subprocess.run(argv, env=_env(probe_dir, tmp_path / "plain.json", PROBE_RC=3), cwd=cwd, timeout=60)
    assert plain.returncode == 3

    got, want = (json.loads((tmp_path / f"{way}.json").read_text()) for way in ("forked", "plain"))
    assert got["name"] == "__main__"
    assert got["argv"] == want["argv"] == ["--client", "site-1"]
    assert got["cwd"] == want["cwd"] == str(cwd)
    assert got["flag"] == "from-the-request"
    assert got["path"] == want["path"] == [str(cwd), str(probe_dir)]  # the working directory, then PYTHONPATH
    assert got["session_leader"]  # as FLARE's Popen(preexec_fn=os.setsid)
    assert got["cmdline"] == want["cmdline"] == argv[1:]  # ps shows the site's command, not the fork server's
    assert got["json_loaded_first"]  # and it is a fork: what the server imported was there before the module ran
    assert capfd.readouterr().out.count("hello from ['--client', 'site-1']") == 2  # our stdout, both ways


def test_a_forked_process_can_hand_its_output_to_the_requester_on_a_pipe(server, probe_dir, tmp_path, capfd):
    """As ``Popen(stdout=PIPE, stderr=STDOUT, stdin=DEVNULL)``: `fedfms loso` reads each fold's lines as they come."""
    argv = [sys.executable, "-m", "probe", "--client", "site-2"]
    forked = ForkedProcess(server.address, argv, _env(probe_dir, tmp_path / "o.json", PROBE_RC=4), str(tmp_path),
                           capture_output=True)
    assert forked.stdout.read() == "hello from ['--client', 'site-2']\n"  # until the process's end closes the pipe
    assert forked.wait(timeout=60) == 4
    forked.stdout.close()
    assert "hello from" not in capfd.readouterr().out  # not on this process's stdout


def test_its_end_is_reported_as_popen_reports_it(server, probe_dir, tmp_path):
    argv = [sys.executable, "-m", "probe"]
    forked = ForkedProcess(server.address, argv, _env(probe_dir, tmp_path / "o.json", PROBE_SLEEP=60), str(tmp_path))
    assert forked.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        forked.wait(timeout=0.3)
    assert psutil.Process(forked.pid).ppid() == server.pid
    os.kill(forked.pid, signal.SIGSTOP)  # a frozen site still ends when killed
    forked.kill()
    assert forked.wait(timeout=30) == -signal.SIGKILL
    assert forked.poll() == -signal.SIGKILL
    forked.terminate()  # after its end: nothing to signal, no error

    ended = ForkedProcess(server.address, argv, _env(probe_dir, tmp_path / "t.json", PROBE_SLEEP=60), str(tmp_path))
    ended.terminate()
    assert ended.wait(timeout=30) == -signal.SIGTERM


def test_one_thread_waiting_does_not_hold_up_another_polling(server, probe_dir, tmp_path):
    # FLARE's job launcher waits for a job's process in one thread while others poll it (fedfms.flare.job_launcher)
    import threading

    argv = [sys.executable, "-m", "probe"]
    forked = ForkedProcess(server.address, argv, _env(probe_dir, tmp_path / "o.json", PROBE_SLEEP=60), str(tmp_path))
    waited = {}
    waiter = threading.Thread(target=lambda: waited.setdefault("rc", forked.wait()), daemon=True)
    waiter.start()
    started = time.monotonic()
    for _ in range(3):
        assert forked.poll() is None
    assert time.monotonic() - started < 5, "poll() waited for the other thread's wait()"
    forked.kill()
    waiter.join(timeout=30)
    assert not waiter.is_alive() and waited["rc"] == -signal.SIGKILL == forked.poll()


def test_only_python_dash_m_commands_are_forked(server, probe_dir, tmp_path):
    with pytest.raises(OSError, match="only `python -m"):
        ForkedProcess(server.address, [sys.executable, "-c", "print(1)"], _env(probe_dir, tmp_path / "o.json"),
                      str(tmp_path))


def test_a_job_whose_code_shadows_a_preloaded_module_starts_plainly(server, probe_dir, tmp_path):
    (probe_dir / "json.py").write_text("raise SystemExit('the job own json module')\n")
    argv = [sys.executable, "-m", "probe"]
    with pytest.raises(OSError, match=r"json\.py, already imported"):
        ForkedProcess(server.address, argv, _env(probe_dir, tmp_path / "o.json"), str(tmp_path))

    popen = site_popen(subprocess.Popen, server)
    # FLARE's command for a site: refused by the fork server, so started as FLARE starts it (the job's json.py runs)
    proc = popen([sys.executable, "-m", WORKER_MODULE, "--client", "x"], preexec_fn=os.setsid,
                 env=_env(probe_dir, tmp_path / "o.json"))
    assert isinstance(proc, subprocess.Popen)
    assert proc.wait(timeout=120) != 0
    # and anything that is not a site's worker is never forked
    other = popen([sys.executable, "-c", "import os; print(os.getppid())"], stdout=subprocess.PIPE)
    assert isinstance(other, subprocess.Popen)
    assert int(other.communicate(timeout=60)[0]) == os.getpid()


def test_a_lost_fork_server_ends_its_sites_and_reports_them_ended(probe_dir, tmp_path):
    doomed = ForkServer(preload=("json",))
    try:
        argv = [sys.executable, "-m", "probe"]
        forked = ForkedProcess(doomed.address, argv, _env(probe_dir, tmp_path / "o.json", PROBE_SLEEP=60),
                               str(tmp_path))
        os.kill(doomed.pid, signal.SIGKILL)
        assert forked.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while psutil.pid_exists(forked.pid) and psutil.Process(forked.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the site outlived the report of its end"
            time.sleep(0.1)
    finally:
        doomed.close()


def test_closing_ends_the_fork_server_and_the_switch_turns_it_off(probe_dir, monkeypatch):
    server = ForkServer(preload=("json",))
    pid = server.pid
    server.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not Path(server.address).exists()

    monkeypatch.setenv("FEDFMS_SITE_FORKSERVER", "0")
    assert site_forkserver.ensure_fork_server() is None


def test_a_fedfms_process_started_by_one_with_a_fork_server_uses_that_one(server, probe_dir, tmp_path, monkeypatch):
    # `fedfms loso` starts one and runs each fold's `fedfms simulate` in a child process: the folds fork from it
    monkeypatch.setattr(site_forkserver, "_SERVER", None)
    monkeypatch.setenv(site_forkserver.ADDRESS_ENV, server.address)
    inherited = site_forkserver.ensure_fork_server()
    assert isinstance(inherited, site_forkserver.InheritedForkServer) and inherited.address == server.address

    # a stale address (its process gone): this process starts its own and names it to its children
    monkeypatch.setattr(site_forkserver, "_SERVER", None)
    monkeypatch.setenv(site_forkserver.ADDRESS_ENV, str(tmp_path / "gone.sock"))
    monkeypatch.setattr(site_forkserver, "ForkServer", lambda *_: ForkServer(preload=("json",)))
    own = site_forkserver.ensure_fork_server()
    try:
        assert isinstance(own, ForkServer) and own.alive()
        assert os.environ[site_forkserver.ADDRESS_ENV] == own.address
        assert site_forkserver.ensure_fork_server() is own  # started once, then reused
    finally:
        own.close()

    # another Python than the fork server's is never forked
    with pytest.raises(OSError, match="not this fork server's Python"):
        ForkedProcess(server.address, ["/bin/sh", "-m", "probe"], _env(probe_dir, tmp_path / "o.json"), str(tmp_path))
