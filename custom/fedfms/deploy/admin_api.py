"""Manage FedFMS jobs with the FLARE API from an admin startup kit (what the admin console does, scriptable).

    KIT=/secure/kits/admin@fedfms.example.org
    python provisioning/admin_api.py --kit $KIT status                     # server + connected sites
    python provisioning/admin_api.py --kit $KIT submit jobs/fedmsa         # prints the job id
    python provisioning/admin_api.py --kit $KIT list
    python provisioning/admin_api.py --kit $KIT monitor JOB_ID             # follows it to the end
    python provisioning/admin_api.py --kit $KIT abort JOB_ID
    python provisioning/admin_api.py --kit $KIT dead JOB_ID hospital-c     # a site is gone: stop waiting for it
    python provisioning/admin_api.py --kit $KIT download JOB_ID --out results/
    python provisioning/admin_api.py --kit $KIT shutdown                   # server and all sites

The user name defaults to the kit folder's name, which is how ``nvflare provision`` names admin kits.
FLARE's own ``nvflare job submit/list/monitor/abort/download`` and ``nvflare system status/shutdown`` do the
same from the shell (docs/admin.md); this adds ``dead`` (no ``nvflare`` command sends it), the one-line
explanation when ``abort`` meets a job left RUNNING by a killed server, and the functions the deploy tests
call. ``provisioning/admin_api.py`` and ``python -m fedfms.deploy.admin_api`` are the same command.
Exit code 0 on success; ``monitor`` exits 1 when the job ended in any state other than FINISHED:COMPLETED. A status
poll the server leaves unanswered is asked again (:func:`follow_job`).
A refused command (unknown job, not allowed, job not running, ...) prints one ``error:`` line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

COMPLETED = "FINISHED:COMPLETED"


def connect(kit: str | Path, user: str | None = None, timeout: float = 30.0):
    """A secure session as ``user`` (mutual TLS with the kit's certificate). Raises when the server cannot
    be reached or refuses the certificate."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit = Path(kit).resolve()
    if not (kit / "startup" / "fed_admin.json").is_file():
        raise FileNotFoundError(f"{kit} is not an admin startup kit (no startup/fed_admin.json)")
    return new_secure_session(user or kit.name, str(kit), timeout=timeout)


def submit(sess, job_dir: str | Path) -> str:
    return sess.submit_job(str(Path(job_dir).resolve()))


def list_jobs(sess, limit: int | None = None) -> list[dict]:
    return sess.list_jobs(detailed=True, limit=limit)


# FLARE's admin commands give up on an answer after 5 s; a server busy starting jobs (or a machine busy with
# other work) can miss that once or twice while the job runs on. Polls left unanswered this many times in a row,
# with no observation that the server is alive, end the wait (the server is taken to be gone).
UNANSWERED_POLLS = 6


def follow_job(sess, job_id: str, timeout: float = 0.0, interval: float = 5.0, on_status=None,
               server_alive=None, echo=print) -> dict | None:
    """Poll the job's status until it is terminal; returns its meta, or None after ``timeout`` seconds (0: no limit).
    ``on_status(status)`` is called on each change. A poll the server does not answer is asked again: while
    ``server_alive()`` says the server process runs (POC: its PID on this machine), or else up to
    :data:`UNANSWERED_POLLS` times in a row."""
    from nvflare.fuel.flare_api.api_spec import NoConnection

    seen, unanswered = [None], [0]

    def on_poll(_session, _jid, meta, *a, **k):
        unanswered[0] = 0
        status = meta.get("status")
        if status != seen[0]:
            seen[0] = status
            if on_status is not None:
                on_status(status)
        return True

    start = time.monotonic()
    while True:
        left = 0.0 if not timeout else timeout - (time.monotonic() - start)
        if timeout and left <= 0:
            return None
        try:
            _, meta = sess.monitor_job_and_return_job_meta(job_id, timeout=left, poll_interval=interval, cb=on_poll)
            return meta
        except NoConnection as exc:
            unanswered[0] += 1
            alive = server_alive() if server_alive is not None else None
            if alive is False or (alive is None and unanswered[0] >= UNANSWERED_POLLS):
                raise
            echo(f"[{time.strftime('%H:%M:%S')}] {job_id}: the server did not answer a status poll ({exc}); "
                 f"asking again")
            time.sleep(interval)


def monitor(sess, job_id: str, timeout: float = 0.0, interval: float = 5.0, echo=print) -> dict:
    """Poll until the job reaches a terminal state; echo each status change. ``timeout`` 0 = no limit."""
    meta = follow_job(sess, job_id, timeout, interval, echo=echo,
                      on_status=lambda status: echo(f"[{time.strftime('%H:%M:%S')}] {job_id} {status}"))
    if meta is None:
        raise TimeoutError(f"job {job_id} still running after {timeout:.0f}s")
    return meta


class CommandRefused(RuntimeError):
    """The server answered, but refused or could not do what was asked (one line, no traceback)."""


def _flare_errors() -> tuple:
    from nvflare.fuel.flare_api import api_spec

    names = ("InternalError", "JobNotFound", "JobNotDone", "JobNotRunning", "AuthorizationError",
             "InvalidJobDefinition", "InvalidArgumentError", "NoConnection", "SessionClosed", "CommandError")
    return tuple(getattr(api_spec, n) for n in names if hasattr(api_spec, n))


def abort(sess, job_id: str) -> str:
    """Abort a job. A job that the job store calls RUNNING but whose server process is gone (the server was
    killed and restarted: FLARE 2.9 does not resume it) cannot be aborted; say so instead of a traceback."""
    try:
        return sess.abort_job(job_id)
    except _flare_errors() as exc:
        if "is not running" in str(exc):
            raise CommandRefused(
                f"job {job_id} is not running on the server although its status may still say RUNNING: it was "
                f"left behind by a server restart. On the server machine run "
                f"'python provisioning/site_setup.py stale-jobs <server kit> --finish' to mark it "
                f"FINISHED:ABANDONED") from exc
        raise


def report_dead(sess, job_id: str, sites: list[str]) -> list[str]:
    """Tell the job's server process that ``sites`` are dead (FLARE's hidden project-admin command
    ``dead <site> <job>``), so its current workflow stops waiting for them after the dead-client grace period.
    FLARE sends this report by itself only once, when the server drops a site after ``heart_beat_timeout``;
    if the job then moves on to its next workflow (training -> cross-site evaluation) the new workflow does
    not know and waits for its task timeouts. Report only sites that are really gone."""
    out = []
    for site in sites:
        res = sess.do_command(f"dead {site} {job_id}")
        if not isinstance(res, dict) or str(res.get("status", "")).upper() not in ("SUCCESS", "OK"):
            raise CommandRefused(f"dead {site} {job_id}: {res}")
        out.append(site)
    return out


def download(sess, job_id: str, out: str | Path) -> Path:
    return Path(sess.download_job_result(job_id, destination=str(Path(out).resolve())))


def status(sess) -> dict:
    info = sess.get_system_info()
    return {"server": info.server_info.status,
            "sites": sorted(c.name for c in info.client_info),
            "running_jobs": [j.job_id for j in info.job_info]}


def shutdown(sess, target: str = "all", timeout: float = 60.0) -> dict:
    return sess.shutdown(target, wait=True, timeout=timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kit", required=True, help="admin startup kit folder (contains startup/fed_admin.json)")
    ap.add_argument("--user", help="admin user name (default: the kit folder's name)")
    ap.add_argument("--connect-timeout", type=float, default=30.0)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", help="server state, connected sites, running jobs")
    p = sub.add_parser("submit", help="submit a job folder")
    p.add_argument("job")
    p = sub.add_parser("list", help="list jobs")
    p.add_argument("--limit", type=int)
    p = sub.add_parser("monitor", help="follow a job until it ends")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, default=0.0)
    p.add_argument("--interval", type=float, default=5.0)
    p = sub.add_parser("abort", help="abort a job")
    p.add_argument("job_id")
    p = sub.add_parser("dead", help="tell a running job that sites are gone (it stops waiting for them)")
    p.add_argument("job_id")
    p.add_argument("sites", nargs="+")
    p = sub.add_parser("download", help="download a finished job's result")
    p.add_argument("job_id")
    p.add_argument("--out", default=".")
    p = sub.add_parser("shutdown", help="shut down the server and sites (project admin only)")
    p.add_argument("--target", choices=["all", "server", "client"], default="all")
    args = ap.parse_args(argv)

    sess = connect(args.kit, args.user, timeout=args.connect_timeout)
    rc = 0
    try:
        rc = _run(sess, args)
    except (CommandRefused, *_flare_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        rc = 1
    finally:
        if args.cmd != "shutdown":
            sess.close()
    return rc


def _run(sess, args) -> int:
    rc = 0
    if args.cmd == "status":
        print(json.dumps(status(sess), indent=2))
    elif args.cmd == "submit":
        print(submit(sess, args.job))
    elif args.cmd == "list":
        for job in list_jobs(sess, args.limit):
            print(f"{job.get('job_id')}  {job.get('name', ''):<14} {job.get('status', ''):<24} "
                  f"{job.get('submit_time_iso', job.get('submit_time', ''))}")
    elif args.cmd == "monitor":
        meta = monitor(sess, args.job_id, timeout=args.timeout, interval=args.interval)
        rc = 0 if meta.get("status") == COMPLETED else 1
    elif args.cmd == "abort":
        print(abort(sess, args.job_id))
    elif args.cmd == "dead":
        print(f"reported dead to job {args.job_id}: {', '.join(report_dead(sess, args.job_id, args.sites))}")
    elif args.cmd == "download":
        print(download(sess, args.job_id, args.out))
    elif args.cmd == "shutdown":
        print(json.dumps(shutdown(sess, args.target), indent=2, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
