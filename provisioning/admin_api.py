#!/usr/bin/env python3
"""Manage FedFMS jobs with the FLARE API from an admin startup kit (what the admin console does, scriptable).

    KIT=/secure/kits/admin@fedfms.example.org
    python provisioning/admin_api.py --kit $KIT status                     # server + connected sites
    python provisioning/admin_api.py --kit $KIT submit jobs/fedmsa         # prints the job id
    python provisioning/admin_api.py --kit $KIT list
    python provisioning/admin_api.py --kit $KIT monitor JOB_ID             # follows it to the end
    python provisioning/admin_api.py --kit $KIT abort JOB_ID
    python provisioning/admin_api.py --kit $KIT download JOB_ID --out results/
    python provisioning/admin_api.py --kit $KIT shutdown                   # server and all sites

The user name defaults to the kit folder's name, which is how ``nvflare provision`` names admin kits.
Exit code 0 on success; ``monitor`` exits 1 when the job ended in any state other than FINISHED:COMPLETED.
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


def monitor(sess, job_id: str, timeout: float = 0.0, interval: float = 5.0, echo=print) -> dict:
    """Poll until the job reaches a terminal state; echo each status change. ``timeout`` 0 = no limit."""
    seen = [None]

    def on_poll(_session, jid, meta, *a, **k):
        status = meta.get("status")
        if status != seen[0]:
            echo(f"[{time.strftime('%H:%M:%S')}] {jid} {status}")
            seen[0] = status
        return True

    _, meta = sess.monitor_job_and_return_job_meta(job_id, timeout=timeout, poll_interval=interval, cb=on_poll)
    if meta is None:
        raise TimeoutError(f"job {job_id} still running after {timeout:.0f}s")
    return meta


def abort(sess, job_id: str) -> str:
    return sess.abort_job(job_id)


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
    p = sub.add_parser("download", help="download a finished job's result")
    p.add_argument("job_id")
    p.add_argument("--out", default=".")
    p = sub.add_parser("shutdown", help="shut down the server and sites (project admin only)")
    p.add_argument("--target", choices=["all", "server", "client"], default="all")
    args = ap.parse_args(argv)

    sess = connect(args.kit, args.user, timeout=args.connect_timeout)
    rc = 0
    try:
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
        elif args.cmd == "download":
            print(download(sess, args.job_id, args.out))
        elif args.cmd == "shutdown":
            print(json.dumps(shutdown(sess, args.target), indent=2, default=str))
    finally:
        if args.cmd != "shutdown":
            sess.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
