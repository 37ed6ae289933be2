"""fedfms.processes.stop_group: a process group is stopped when every process of it has ended, not only its leader
(a CI run found a torchrun rank still running right after its launcher had returned)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedfms.processes import group_alive, stop_group

# a member of the leader's group that needs a moment after SIGTERM (a rank saving its log), or ignores it
MEMBER = """
import signal, sys, time
if sys.argv[1] == "slow":
    signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.0), sys.exit(0)))
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(120)
"""
LEADER = f"""
import subprocess, sys, time
member = subprocess.Popen([sys.executable, "-c", {MEMBER!r}, sys.argv[1]], stdout=subprocess.PIPE)
member.stdout.readline()
print(member.pid, flush=True)
time.sleep(120)
"""


def _group(kind: str) -> tuple[subprocess.Popen, int]:
    leader = subprocess.Popen([sys.executable, "-c", LEADER, kind], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    return leader, int(leader.stdout.readline())


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stop_group_returns_after_the_last_member_not_the_leader():
    leader, member = _group("slow")  # the leader dies at SIGTERM at once, its member 1 s later
    assert group_alive(leader.pid) and _running(member)
    stop_group(leader, grace_s=10)
    assert leader.returncode is not None
    assert not _running(member) and not group_alive(leader.pid)


def test_a_member_ignoring_sigterm_is_killed_after_the_grace():
    leader, member = _group("stubborn")
    stop_group(leader, grace_s=0.5)
    assert not _running(member) and not group_alive(leader.pid)
