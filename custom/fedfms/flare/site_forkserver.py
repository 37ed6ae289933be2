"""Simulated site processes forked from a process that has already imported what a site imports.

A simulated site's process spends 4-5 CPU-s on imports (torch, FLARE, MONAI, segment-anything:
``bench/bench_site_start.py``) before it trains. FLARE's simulator starts one per site per run, and a 16-site run
starts sixteen at once. Here one *fork server* per simulating process pays the imports once; each site's process is
then a fork of it (milliseconds, and memory pages shared with its siblings), running FLARE's own
``simulator_worker`` module exactly as ``python -m`` would: the same arguments, environment, working directory,
standard streams, session, process title (``ps`` shows the usual command) and exit code.

Forking is safe here because the fork server never runs a torch operation, CUDA or a thread pool of its own: it
only imports and then waits for requests. It forks a site only when the site's ``PYTHONPATH`` adds no module it
has already imported (a job's own ``custom/`` code must be the one that runs); otherwise, and whenever the fork server
is not there, the site starts as a plain process. ``FEDFMS_SITE_FORKSERVER=0`` turns it off.

Protocol (one Unix-socket connection per site process): the request is one JSON line (``argv``, ``env``, ``cwd``)
sent with the requester's stdin/stdout/stderr descriptors; the fork server answers ``{"pid": N}`` (or
``{"refused": why}``) and, when that process ends, ``{"returncode": rc}`` (negative: the signal, as
:class:`subprocess.Popen` reports it).
"""

from __future__ import annotations

import json
import logging
import os
import select
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORKER_MODULE = "nvflare.private.fed.app.simulator.simulator_worker"
# what a simulated site imports before its first task (fedfms.flare.executor: torch, MONAI, segment-anything);
# torch._dynamo: torch's optimizers import it on first use
PRELOAD = (WORKER_MODULE, "fedfms.flare.executor", "torch._dynamo")
DISABLE_ENV = "FEDFMS_SITE_FORKSERVER"
# where this process's fork server listens, for the fedfms processes it starts (`fedfms loso` runs each fold's
# simulation in a child process): they fork their sites from it instead of starting and importing one of their own
ADDRESS_ENV = "FEDFMS_SITE_FORKSERVER_ADDRESS"
REAP_EVERY_S = 0.2
WAIT_STEP_S = 0.5

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- the requesting side
class ForkServer:
    """The fork server of this process, started on first use (its imports overlap the simulator's own start-up).
    Processes forked from this one (FLARE's simulator runs its server and client runner in one) reach it through the
    same socket address."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD):
        self._dir = tempfile.mkdtemp(prefix="fedfms-forkserver-")
        self.address = os.path.join(self._dir, "sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.address)
        listener.listen(64)  # requests queue here while the fork server is still importing
        # its stdin is a pipe from here: end of file (every holder gone) ends the fork server
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, str(listener.fileno()), *preload],
                                      stdin=subprocess.PIPE,
                                      pass_fds=[listener.fileno()], start_new_session=True)
        listener.close()
        self.pid = self._proc.pid

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        try:  # a zombie still answers kill(0): ask the kernel for its state
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return True

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


class InheritedForkServer:
    """The fork server of a fedfms process that started this one (its address in :data:`ADDRESS_ENV`)."""

    def __init__(self, address: str):
        self.address = address

    def alive(self) -> bool:
        return reachable(self.address)


def reachable(address: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address)
        return True
    except OSError:
        return False
    finally:
        probe.close()


_SERVER: ForkServer | InheritedForkServer | None = None
_SERVER_LOCK = threading.Lock()


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def ensure_fork_server(preload: tuple[str, ...] = PRELOAD) -> ForkServer | InheritedForkServer | None:
    """The fork server this process's simulations (or jobs: fedfms.flare.job_launcher) use: the one of the fedfms
    process that started this one, or its own, importing ``preload`` (started now if it is not running); None when
    turned off."""
    global _SERVER
    if not enabled():
        return None
    with _SERVER_LOCK:
        if _SERVER is None or not _SERVER.alive():
            inherited = os.environ.get(ADDRESS_ENV)
            if inherited and reachable(inherited):
                _SERVER = InheritedForkServer(inherited)
            else:
                _SERVER = ForkServer(preload)
                import atexit

                atexit.register(_SERVER.close)
                os.environ[ADDRESS_ENV] = _SERVER.address
        return _SERVER


class ForkedProcess:
    """What FLARE's simulator uses of a :class:`subprocess.Popen`, for a process the fork server forked."""

    def __init__(self, address: str, args: list[str], env: dict, cwd: str, capture_output: bool = False):
        """``capture_output``: its stdout and stderr go to a pipe, read as text lines from ``self.stdout`` (as
        ``Popen(stdout=PIPE, stderr=STDOUT, stdin=DEVNULL, text=True)``); otherwise it has this process's three."""
        self.args = args
        self.returncode: int | None = None
        self._buf = b""
        # FLARE's job launcher waits on a job's process in one thread and polls it from others: one reader at a time
        self._reading = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds, read_end = [0, 1, 2], None
        if capture_output:
            read_end, write_end = os.pipe()
            fds = [os.open(os.devnull, os.O_RDONLY), write_end, write_end]
        try:
            try:
                self._sock.connect(address)
                request = json.dumps({"argv": args, "env": env, "cwd": cwd}).encode() + b"\n"
                socket.send_fds(self._sock, [request], fds)
                answer = self._read(None)
            finally:
                if read_end is not None:  # the child has its own copies: the pipe ends when its copies are closed
                    os.close(fds[0])
                    os.close(fds[1])
            if answer is None or "pid" not in answer:
                raise OSError(f"the fork server did not start {shlex.join(args[1:3])}: "
                              f"{(answer or {}).get('refused', answer)}")
        except BaseException:
            self._sock.close()
            if read_end is not None:
                os.close(read_end)
            raise
        self.stdout = None if read_end is None else open(read_end, errors="replace")
        self.pid = int(answer["pid"])

    def _read(self, timeout: float | None) -> dict | None:
        """The next message, or None if none came within ``timeout`` (0: do not wait). The connection closing without
        a return code (the fork server itself was killed) reads as a lost process."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                return None
            except OSError:
                chunk = b""
            if not chunk:
                return {"returncode": -signal.SIGKILL, "lost": True}
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _settle(self, timeout: float | None) -> None:
        """Read the end of the process if it has come (waiting up to ``timeout``). The wait for data holds no lock,
        so a thread in ``wait()`` never holds up another's ``poll()``; the read itself is one thread at a time."""
        if self.returncode is not None:
            return
        if timeout != 0:
            try:
                ready, _, _ = select.select([self._sock], [], [], timeout)
            except (OSError, ValueError):  # closed by another thread, which has read the end
                return
            if not ready:
                return
        with self._reading:
            if self.returncode is not None:  # another thread read it meanwhile
                return
            message = self._read(0)
            if message is not None and "returncode" in message:
                if message.get("lost"):  # its fork server is gone: end the process too, so it is gone as reported
                    try:
                        os.kill(self.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.returncode = int(message["returncode"])
                self._sock.close()

    def poll(self) -> int | None:
        self._settle(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = WAIT_STEP_S if deadline is None else min(WAIT_STEP_S, deadline - time.monotonic())
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._settle(left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self._settle(0)  # an end already reported: the fork server has reaped it, its PID may be another's by now
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def site_popen(real_popen, server: ForkServer | InheritedForkServer | None):
    """A ``subprocess.Popen`` for FLARE's simulator: its ``python -m ...simulator_worker`` commands are forked by
    ``server``; anything else, or a site the fork server refuses, starts as FLARE starts it."""

    def popen(args, *pargs, **kwargs):
        argv = shlex.split(args) if isinstance(args, str) else list(args)
        simple = not pargs and set(kwargs) <= {"shell", "preexec_fn", "env"} and not kwargs.get("shell")
        if server is not None and simple and argv[1:3] == ["-m", WORKER_MODULE]:
            try:
                process = ForkedProcess(server.address, argv, dict(kwargs.get("env") or os.environ), os.getcwd())
                site = argv[argv.index("--client") + 1] if "--client" in argv[:-1] else ""
                with _FORKED_LOCK:
                    _FORKED.setdefault(site, []).append(process)
                return process
            except (OSError, ValueError) as exc:
                log.info("site process started plainly: %s", exc)
        return real_popen(args, *pargs, **kwargs)

    return popen


_FORKED: dict[str, list[ForkedProcess]] = {}  # by site: the processes this process had forked for it
_FORKED_LOCK = threading.Lock()


def forked_site_processes(site: str) -> list[ForkedProcess]:
    """The forked processes of ``site`` this process started that have not ended yet."""
    with _FORKED_LOCK:
        alive = [p for p in _FORKED.get(site, []) if p.poll() is None]
        _FORKED[site] = alive
        return list(alive)


class SubprocessWithForkedSites:
    """The ``subprocess`` module as FLARE's simulator module sees it while a simulation runs (everything else is the
    real module)."""

    def __init__(self, server: ForkServer | InheritedForkServer | None):
        self.Popen = site_popen(subprocess.Popen, server)

    def __getattr__(self, name):
        return getattr(subprocess, name)


# --------------------------------------------------------------------------------------------- the fork server
def _refusal(argv: list[str], env: dict) -> str | None:
    """Why this site cannot be a fork: another Python, or its PYTHONPATH adds a folder with a module this process
    already imported."""
    if not argv or os.path.realpath(argv[0]) != os.path.realpath(sys.executable):
        return f"{argv[:1]} is not this fork server's Python ({sys.executable})"
    if len(argv) < 3 or argv[1] != "-m":
        return f"{shlex.join(argv[:3])}: only `python -m <module> ...` commands are forked"
    own = {os.path.realpath(p) for p in sys.path if p}  # FLARE passes its whole sys.path on as PYTHONPATH
    loaded = {name.split(".")[0] for name in sys.modules}
    for folder in filter(None, env.get("PYTHONPATH", "").split(os.pathsep)):
        if os.path.realpath(folder) in own or not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            name = entry[:-3] if entry.endswith(".py") else entry
            if name in loaded and (entry.endswith(".py") or os.path.isdir(os.path.join(folder, entry))):
                return f"{folder} holds {entry}, already imported by the fork server"
    return None


def _serve(listener: socket.socket, parent: int) -> tuple[dict, list[int]] | None:
    """Accept requests until the pipe on stdin closes (returns None), forking a site for each. In the forked child
    this returns the child's request and descriptors."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "listen")
    selector.register(parent, selectors.EVENT_READ, "parent")
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select(timeout=REAP_EVERY_S):
            if key.data == "parent":
                if not os.read(parent, 4096):
                    return None
                continue
            conn, _ = listener.accept()
            try:
                conn.settimeout(30)
                raw, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                while not raw.endswith(b"\n"):
                    more = conn.recv(1 << 20)
                    if not more:
                        raise OSError("request cut short")
                    raw += more
                request = json.loads(raw)
            except (OSError, ValueError):
                conn.close()
                continue
            why = _refusal(request["argv"], request["env"])
            if why is not None or len(fds) != 3:
                conn.sendall(json.dumps({"refused": why or "expected 3 descriptors"}).encode() + b"\n")
                conn.close()
                for fd in fds:
                    os.close(fd)
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                selector.close()
                listener.close()
                os.close(parent)
                for other in children.values():
                    other.close()
                conn.close()
                return request, fds
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            children[pid] = conn
        while children:  # reap: each ended process's return code to whoever asked for it
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass
                conn.close()


def _become(request: dict, fds: list[int]) -> None:
    """Turn this fork into the process ``python -m <module> <args>`` would have been."""
    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    own = set(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    os.environ.clear()
    os.environ.update(request["env"])
    # sys.path as a fresh `python -m` would build it: the working directory, then PYTHONPATH, then the installation's
    added = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    rest = [p for p in sys.path[1:] if p not in own and p not in added]
    sys.path[:] = [os.getcwd(), *added, *rest]
    argv = request["argv"]
    if os.environ.get("PYTHONUNBUFFERED"):  # the fork server's streams were set up by its own environment
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(write_through=True)
    try:
        import setproctitle

        setproctitle.setproctitle(shlex.join(argv))
    except ImportError:
        pass
    import runpy

    sys.argv = [argv[2], *argv[3:]]
    module = argv[2]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main(argv: list[str]) -> None:
    """``argv``: the listening socket's descriptor, then the modules to import before serving."""
    listener = socket.socket(fileno=int(argv[0]))
    try:  # set up now, while this process's argv and environment are as the kernel laid them out
        import setproctitle

        setproctitle.setproctitle(setproctitle.getproctitle())
    except ImportError:
        pass
    import importlib

    if any(name.startswith("fedfms.") for name in argv[1:]):
        import fedfms.monai_import  # noqa: F401  (MONAI without its unused extras, as a site imports it)
    for name in argv[1:]:
        importlib.import_module(name)
    forked = _serve(listener, sys.stdin.fileno())
    if forked is None:
        return
    _become(*forked)


if __name__ == "__main__":
    main(sys.argv[1:])
