"""Ending a child process and everything it started (FLARE-free): the simulator runs of the evaluation and the
torchrun launches of a multi-GPU site are each started in their own process group, so one signal reaches all."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

POLL_S = 0.05


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which hold nothing, do not count)."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc: the kernel's answer (a zombie member still counts there)
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to ``proc``'s process group, then SIGKILL to what is left after ``grace_s`` seconds; returns once
    ``proc`` and every other process of its group have ended (or 5 s after the SIGKILL). The leader ending first is
    not enough: torchrun exits while its ranks are still shutting down, and a caller that then finds a rank
    running has been left a process. ``proc`` must have been started with ``start_new_session=True``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # the group is gone; still reap proc below
        deadline = time.monotonic() + wait
        while True:
            try:
                proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if proc.returncode is not None and not group_alive(proc.pid):
                return
            if time.monotonic() >= deadline:
                break
