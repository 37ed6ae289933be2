"""Ending a child process and everything it started (FLARE-free): the simulator runs of the evaluation and the
torchrun launches of a multi-GPU site are each started in their own process group, so one signal reaches all."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to ``proc``'s process group, then SIGKILL after ``grace_s`` seconds; returns once it has ended (or
    after 5 more seconds). ``proc`` must have been started with ``start_new_session=True``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # the group is gone; still reap proc below
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
