"""Process and admin-session plumbing shared by the POC CLI (:mod:`fedfms.deploy.poc`) and the deploy tests.

Everything here works from startup kits on disk; it never reads ~/.nvflare, so callers can run with a
private HOME. Processes are tracked by PID: the stock stop scripts are interactive and ``pkill``-style
cleanup would hit other users' federations on the same machine. Kit configuration (allow-list, storage,
``fedfms_site.json``, stale jobs) is :mod:`fedfms.deploy.site_setup`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

import psutil

# the deploy code and tests use these as rt.*; they live in fedfms.ports, which the simulator uses too
from fedfms.ports import FIRST_CONFIG_PORT, ephemeral_port_range, free_port, port_is_free  # noqa: F401

GRACE_S = 15.0


def port_taken_message(log: str | os.PathLike, port: int, since: int = 0) -> str | None:
    """Why a server cannot listen, if its log (from byte ``since`` on) says the port is taken: FLARE
    logs a failed bind and retries it every few seconds for good, so nothing else would ever tell."""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if "address already in use" in line and re.search(rf"\b{port}\b", line):
            return (f"port {port} is taken by another program, so the FLARE server cannot listen on it "
                    f"({log}: address already in use)")
    return None


def port_is_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def site_env(home: str | os.PathLike, extra: dict | None = None) -> dict:
    """Environment for a FLARE process: private HOME, this interpreter first on PATH (start scripts call
    ``python3``), one torch thread unless the caller says otherwise (several site processes share the cores)."""
    env = dict(os.environ)
    env["HOME"] = str(home)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    # A POC workspace variable from the caller's shell must not redirect our nvflare CLI calls.
    env.pop("NVFLARE_POC_WORKSPACE", None)
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def start_kit(kit_dir: str | os.PathLike, log_path: str | os.PathLike, env: dict) -> subprocess.Popen:
    """Start a server or client from its startup kit in the foreground variant of the kit's own script
    (``sub_start.sh --once`` execs python, so the returned PID is the participant itself), in a new
    session so a Ctrl-C in the caller's terminal does not reach it."""
    kit_dir = Path(kit_dir)
    script = kit_dir / "startup" / "sub_start.sh"
    if not script.is_file():
        raise FileNotFoundError(f"{script} missing: {kit_dir} is not a server/client startup kit")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            ["bash", str(script), "--once"],
            cwd=str(kit_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _own_lineage() -> set[int]:
    pids = {os.getpid()}
    try:
        for p in psutil.Process().parents():
            pids.add(p.pid)
    except psutil.Error:
        pass
    return pids


# Job processes (SJ/CJ) are spawned by FLARE with setsid, so killing the parent's process group misses
# them; they are found through the parent's children or through their command line, which always names
# the kit folder. Only FLARE's own processes are matched by path: a user's `less` on a log must survive.
FLARE_MARKERS = ("nvflare", "sub_start.sh")


def processes_under(paths: Iterable[str | os.PathLike]) -> list[psutil.Process]:
    """FLARE processes whose command line names one of ``paths`` (kit or workspace folders of this run)."""
    needles = [str(Path(p).resolve()) for p in paths]
    mine = _own_lineage()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid in mine:
            continue
        cmd = " ".join(proc.info.get("cmdline") or [])
        if any(n in cmd for n in needles) and any(m in cmd for m in FLARE_MARKERS):
            found.append(proc)
    return found


def kill_all(pids: Iterable[int] = (), paths: Iterable[str | os.PathLike] = (), grace: float = GRACE_S) -> list[int]:
    """SIGTERM the given PIDs, their descendants and any process of this run found by path; SIGKILL what is
    still alive after ``grace`` seconds. Returns the PIDs that were signalled. Never raises."""
    procs: dict[int, psutil.Process] = {}
    mine = _own_lineage()
    for pid in pids:
        try:
            p = psutil.Process(int(pid))
            procs[p.pid] = p
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except (psutil.Error, ValueError):
            pass
    try:
        for p in processes_under(paths):
            procs[p.pid] = p
            for c in p.children(recursive=True):
                procs[c.pid] = c
    except psutil.Error:
        pass
    for pid in mine:
        procs.pop(pid, None)
    targets = list(procs.values())
    for p in targets:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(targets, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return sorted(procs)


def wait_pids_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until the PIDs have exited; returns those still alive at the deadline."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(int(pid)))
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive]


def tail(path: str | os.PathLike, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# --------------------------------------------------------------------------- admin sessions


def admin_session(username: str, admin_kit: str | os.PathLike, timeout: float = 30.0,
                  server: subprocess.Popen | None = None, server_log: str | os.PathLike | None = None):
    """A secure FLARE API session; retries until ``timeout`` because the server accepts admin logins a
    few seconds after its port opens. Given the server's process and log, fails at once when that
    process exits, and says what the log ends with when it times out."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            return new_secure_session(username, str(admin_kit), timeout=min(10.0, max(1.0, deadline - time.time())))
        except Exception as exc:  # NoConnection while the server boots
            last = exc
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"no admin session for {username}: the server exited with code {server.returncode}"
                               + (f"; its log ends:\n{tail(server_log)}" if server_log else ""))
        time.sleep(1.0)
    raise TimeoutError(f"no admin session for {username} at {admin_kit} within {timeout:.0f}s: {last}"
                       + (f"; the server log ends:\n{tail(server_log)}" if server_log else ""))


def call_with_timeout(fn, timeout: float):
    """Run ``fn()`` in a daemon thread; (True, result) or (False, exception); (None, None) on timeout.
    Used where a library call has no deadline of its own (e.g. a login that is never answered)."""
    box: dict = {}

    def run():
        try:
            box["ok"] = (True, fn())
        except BaseException as exc:  # reported to the caller
            box["ok"] = (False, exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return box.get("ok", (None, None))


def wait_for_clients(session, names: Iterable[str], timeout: float, procs: dict | None = None,
                     logs: dict | None = None) -> list[str]:
    """Block until every named client is connected to the server. If a tracked process dies meanwhile,
    fail at once with its log tail instead of waiting out the timeout."""
    want = set(names)
    deadline = time.time() + timeout
    connected: set[str] = set()
    while time.time() < deadline:
        try:
            connected = {c.name for c in session.get_connected_client_list()}
        except Exception:
            connected = set()
        if want <= connected:
            return sorted(connected)
        for name, proc in (procs or {}).items():
            if proc is not None and proc.poll() is not None:
                log = (logs or {}).get(name, "")
                raise RuntimeError(f"{name} exited with code {proc.returncode} while waiting for clients:\n"
                                   f"{tail(log) if log else ''}")
        time.sleep(1.0)
    raise TimeoutError(f"clients {sorted(want - connected)} did not connect within {timeout:.0f}s "
                       f"(connected: {sorted(connected)})")


def shutdown_federation(admin_kit: str | os.PathLike, username: str, timeout: float = 60.0) -> bool:
    """Shut down server and all clients through the admin API (``shutdown all``). False if the server
    could not be reached or did not confirm; callers still kill leftovers by PID."""
    try:
        sess = admin_session(username, admin_kit, timeout=10.0)
    except Exception:
        return False
    ok, _ = call_with_timeout(lambda: sess.shutdown("all", wait=True, timeout=timeout), timeout + 10)
    try:
        sess.close()
    except Exception:
        pass
    return bool(ok)


# --------------------------------------------------------------------------- job flavours


def export_byoc_copy(job_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """The bring-your-own-code copy of a production job (the fedfms source in ``app/custom/fedfms``),
    replacing an older copy."""
    from fedfms.flare.jobs import export_byoc  # the job settings load torch and FLARE: only when a copy is made

    return Path(export_byoc(job_dir, out_dir, overwrite=True))
