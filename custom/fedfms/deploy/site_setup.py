"""Site-local configuration of a FedFMS startup kit, done once by each hospital after unpacking its kit.

    # hospital site: allow exactly the classes the fedfms jobs name, say where the data and checkpoint are
    python provisioning/site_setup.py site /opt/fedfms/hospital-a \
        --data-dir /data/fedfms/prepared --checkpoint /models/sam_vit_b_01ec64.pth

    # server: the same allow-list and job guard, nobody may send code; keep job storage on a persistent disk instead of /tmp/nvflare,
    # drop a silent site after 60 s instead of FLARE's 600 s
    python provisioning/site_setup.py server /opt/fedfms/fl.fedfms.example.org --storage /srv/fedfms \
        --heart-beat-timeout 60

    # server, after a crash: jobs the job store still calls RUNNING but no server process runs
    python provisioning/site_setup.py stale-jobs /opt/fedfms/fl.fedfms.example.org --finish

Everything written lives in the kit's ``local/`` folder, which re-provisioning never overwrites:
``resources.json`` (class_allow_list, storage), ``fedfms_site.json`` (data/checkpoint),
``authorization.json`` (who may send custom code). Run it after installing FedFMS on that machine
(provisioning/README.md, step 3): the allow-list it writes is the installed version's
(:func:`fedfms.flare.fed_job.class_allow_list`). ``provisioning/site_setup.py`` and
``python -m fedfms.deploy.site_setup`` are the same command.

``stale-jobs`` is the one maintenance command: FLARE 2.9 does not resume or close a job whose server was
killed (its snapshot persistence is a no-op, ``ServerEngine.persist_components``), so after a restart the job
stays RUNNING in the job store and neither ``abort_job`` ("not running") nor ``delete_job`` ("still running")
accepts it. ``--finish`` marks such jobs ``FINISHED:ABANDONED``, what FLARE's own (never called)
``JobRunner.update_unfinished_jobs`` would do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable
from fedfms.run_record import RUN_RECORD, close_interrupted

# The kit component that checks what a job's arguments point at (fedfms.flare.job_guard), in local/resources.json.
GUARD = {"id": "fedfms_job_guard", "path": "fedfms.flare.job_guard.JobArgumentGuard", "args": {}}
SITE_CONFIG = "fedfms_site.json"
# FLARE's job process launchers -> the ones that fork job processes from a fork server (fedfms.flare.job_launcher)
FORKED_LAUNCHERS = {
    "nvflare.app_common.job_launcher.client_process_launcher.ClientProcessJobLauncher":
        "fedfms.flare.job_launcher.ForkedClientJobLauncher",
    "nvflare.app_common.job_launcher.server_process_launcher.ServerProcessJobLauncher":
        "fedfms.flare.job_launcher.ForkedServerJobLauncher",
}
# The rights a FLARE role can hold; "project_admin": "any" abbreviates all of them.
RIGHTS = ["submit_job", "clone_job", "manage_job", "download_job", "view", "operate", "shell_commands", "byoc",
          "server-predeployed-flwr"]


def _load_local(local_dir: Path, name: str) -> dict:
    """The site's current ``local/<name>``, falling back to the provisioned ``<name>.default``."""
    target = local_dir / name
    source = target if target.is_file() else local_dir / f"{name}.default"
    if not source.is_file():
        raise FileNotFoundError(f"neither {target} nor {source} exists: is {local_dir.parent} a startup kit?")
    return json.loads(source.read_text())


def _local(kit: str | Path) -> Path:
    kit = Path(kit)
    local = kit / "local" if (kit / "local").is_dir() else kit
    if not (local.parent / "startup").is_dir():
        raise FileNotFoundError(f"{kit} is not a startup kit (no startup/ folder next to local/)")
    return local


def fedfms_allow_entries() -> list[str]:
    """Exactly the classes the installed fedfms version's jobs name (stock FLARE ones included)."""
    from fedfms.flare.fed_job import class_allow_list  # renders every job variant: imported only when needed

    return class_allow_list()


def _check_exact(entries: list[str]) -> None:
    """Entries must be importable classes named in full: a prefix (``"fedfms."``) or a function would let a job call
    any callable below it with arguments of its choosing."""
    import importlib
    import inspect

    for entry in entries:
        module, _, name = entry.rpartition(".")
        if entry.endswith(".") or not module:
            raise ValueError(f"allow-list entry {entry!r} is a prefix; expected a full class path")
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"allow-list entry {entry!r} cannot be imported here ({exc})") from None
        if not inspect.isclass(obj):
            raise ValueError(f"allow-list entry {entry!r} is a {type(obj).__name__}, not a class")


def add_class_allow_list(kit: str | Path, classes: Iterable[str] | None = None) -> tuple[Path, list[str]]:
    """Allow exactly ``classes`` (default: what the fedfms production jobs name) in ``local/resources.json``, keeping
    the provisioned FLARE class entries and everything else the site configured, but removing every *prefix* entry
    (ending with a dot): it admits functions too. Also installs the job argument guard
    (:class:`fedfms.flare.job_guard.JobArgumentGuard`). Returns the file and the prefix entries removed."""
    classes = fedfms_allow_entries() if classes is None else list(classes)
    _check_exact(classes)
    local = _local(kit)
    resources = _load_local(local, "resources.json")
    current = list(resources.get("class_allow_list", []))
    removed = [e for e in current if isinstance(e, str) and (e.endswith(".") or e == "*")]
    allow = [e for e in current if e not in removed]
    allow += [c for c in classes if c not in allow]
    resources["class_allow_list"] = allow
    resources["class_list_enforcement_mode"] = "enforce"
    components = [c for c in resources.get("components", []) if c.get("id") != GUARD["id"]]
    resources["components"] = components + [dict(GUARD)]
    path = local / "resources.json"
    path.write_text(json.dumps(resources, indent=2) + "\n")
    return path, removed


def use_forked_job_launcher(kit: str | Path) -> Path:
    """Start the kit's job processes as forks of a fork server that has imported what a job imports
    (:mod:`fedfms.flare.job_launcher`) instead of fresh interpreters: the kit's ``process_launcher`` component in
    ``local/resources.json``."""
    local = _local(kit)
    resources = _load_local(local, "resources.json")
    launchers = [c for c in resources.get("components", []) if c.get("id") == "process_launcher"]
    if not launchers:
        raise ValueError(f"{local}: no process_launcher component; expected a FLARE 2.5+ server or site kit")
    path = launchers[0].get("path")
    if path not in FORKED_LAUNCHERS and path not in FORKED_LAUNCHERS.values():
        raise ValueError(f"{local}/resources.json: process_launcher is {path!r}; expected FLARE's process launcher "
                         f"({' or '.join(FORKED_LAUNCHERS)})")
    launchers[0]["path"] = FORKED_LAUNCHERS.get(path, path)
    out = local / "resources.json"
    out.write_text(json.dumps(resources, indent=2) + "\n")
    return out


def set_server_storage(kit: str | Path, root: str | Path) -> Path:
    """Point the server's job store and snapshot store at ``root`` (provisioned default: /tmp/nvflare,
    which is wiped at reboot and shared by every federation on the machine)."""
    local = _local(kit)
    resources = _load_local(local, "resources.json")
    root = Path(root).resolve()
    resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = str(root / "snapshot-storage")
    jobs = [c for c in resources.get("components", []) if c.get("id") == "job_manager"]
    if not jobs:
        raise ValueError(f"{local}: no job_manager component; is this a server kit?")
    jobs[0].setdefault("args", {})["uri_root"] = str(root / "jobs-storage")
    path = local / "resources.json"
    path.write_text(json.dumps(resources, indent=2) + "\n")
    return path


def set_server_liveness(kit: str | Path, heart_beat_timeout: float) -> Path:
    """How long the server waits for a site's heartbeat (sites send one every ~10 s) before it drops the site
    and tells the site's running jobs it is dead: ``servers[0].heart_beat_timeout`` in ``local/resources.json``
    (provisioned default 600 s). Only after that does a job stop waiting for a site that was killed."""
    local = _local(kit)
    resources = _load_local(local, "resources.json")
    servers = resources.get("servers")
    if not servers:
        raise ValueError(f"{local}: no 'servers' section; is this a server kit?")
    if heart_beat_timeout < 20:
        raise ValueError(f"heart_beat_timeout {heart_beat_timeout} s: sites send a heartbeat every ~10 s; use >= 20")
    servers[0]["heart_beat_timeout"] = heart_beat_timeout
    path = local / "resources.json"
    path.write_text(json.dumps(resources, indent=2) + "\n")
    return path


UNFINISHED = ("RUNNING", "DISPATCHED")
ABANDONED = "FINISHED:ABANDONED"


def _job_store(kit: str | Path) -> Path:
    resources = _load_local(_local(kit), "resources.json")
    jobs = [c for c in resources.get("components", []) if c.get("id") == "job_manager"]
    if not jobs:
        raise ValueError(f"{kit}: no job_manager component; is this a server kit?")
    # SimpleJobDefManager's own default and override, as FLARE reads them.
    return Path(os.environ.get("NVFL_JOB_STORE_ROOT") or jobs[0].get("args", {}).get("uri_root", "jobs"))


def _live_job_ids(job_ids: Iterable[str]) -> set[str]:
    """Job ids named on the command line of a running process (a server job process carries its job id)."""
    wanted, live = set(job_ids), set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        live |= {j for j in wanted if j in cmd}
    return live


def stale_jobs(kit: str | Path, finish: bool = False) -> list[tuple[str, str]]:
    """Jobs the server kit's job store calls RUNNING/DISPATCHED although no process on this machine runs them
    (left behind by a killed server). With ``finish`` they are marked FINISHED:ABANDONED, after which the
    admin commands (list, download, delete) treat them as any finished job. Run it on the server machine."""
    store = _job_store(kit)
    unfinished = {}
    for meta_path in sorted(store.glob("*/meta")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("status") in UNFINISHED:
            unfinished[meta_path.parent.name] = (meta_path, meta)
    live = _live_job_ids(unfinished) if unfinished else set()
    stale = []
    for job_id, (meta_path, meta) in unfinished.items():
        if job_id in live:
            continue
        stale.append((job_id, meta["status"]))
        if finish:
            meta["status"] = ABANDONED
            tmp = meta_path.with_name("meta.tmp")
            tmp.write_text(json.dumps(meta))
            tmp.replace(meta_path)
            close_run_record(Path(kit) / job_id)
    return stale


def close_run_record(run_dir: Path) -> Path | None:
    """The job's run record (``fedfms_run.json`` in the server's run folder), left ``running`` by the killed
    server, closed as ``failed`` with where it stopped and how to continue, so that ``fedfms report`` tells the
    truth about it."""
    path = Path(run_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    done = [r["round"] for r in record.get("rounds", []) if r.get("seconds") is not None]
    saved = record.get("persisted_round")
    reason = (f"the server stopped during the job ({len(done)} round(s) finished, the last global model saved after "
              f"round {saved}); closed by stale-jobs on {__import__('time').strftime('%Y-%m-%d %H:%M')}; "
              f"`fedfms job resume` continues it from round {saved + 1 if saved is not None else 0}")
    close_interrupted(record, reason)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def write_site_config(kit: str | Path, **settings) -> Path:
    """``local/fedfms_site.json``: this site's data folder, SAM checkpoint, device, threads. The executor
    reads it at job start and it wins over the job's defaults, so one job runs unchanged everywhere."""
    local = _local(kit)
    path = local / SITE_CONFIG
    current = json.loads(path.read_text()) if path.is_file() else {}
    as_text = lambda v: [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v) if isinstance(v, Path) else v
    current.update({k: as_text(v) for k, v in settings.items() if v is not None})
    path.write_text(json.dumps(current, indent=2) + "\n")
    return path


def set_byoc(kit: str | Path, roles: Iterable[str]) -> Path:
    """``local/authorization.json`` where exactly ``roles`` may run jobs carrying custom code at this site
    (everything else as provisioned). ``roles=[]`` makes the site accept production-flavour jobs only."""
    local = _local(kit)
    policy = _load_local(local, "authorization.json")
    roles = set(roles)
    for role, perms in list(policy["permissions"].items()):
        if isinstance(perms, str):
            perms = {r: perms for r in RIGHTS}
        if role in roles:
            perms["byoc"] = "any"
        elif "byoc" in perms or role == "project_admin":
            perms["byoc"] = "none"
        policy["permissions"][role] = perms
    path = local / "authorization.json"
    path.write_text(json.dumps(policy, indent=2) + "\n")
    return path


FORK_HELP = ("start each job's process as a fork of one process that has imported torch, MONAI and FLARE (saves "
             "4-5 CPU-s per job; fedfms.flare.job_launcher)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("site", help="configure a hospital's client kit")
    s.add_argument("kit", help="the unpacked startup kit folder (contains startup/ and local/)")
    s.add_argument("--data-dir", help="the site's prepared data folder")
    s.add_argument("--data-root", nargs="+", metavar="DIR",
                   help="folder(s) below which a job may name its own data_dir (default: only --data-dir)")
    s.add_argument("--checkpoint", help="SAM checkpoint (.pth) on this machine")
    s.add_argument("--checkpoint-dir", nargs="+", metavar="DIR",
                   help="folder(s) from which a job may name its own checkpoint (default: --checkpoint's folder)")
    s.add_argument("--device", help="e.g. cuda:0 or cpu")
    s.add_argument("--threads", type=int, help="torch CPU threads for training")
    s.add_argument("--no-allow-list", action="store_true", help="leave class_allow_list as provisioned")
    s.add_argument("--byoc-roles", nargs="*", metavar="ROLE", default=[],
                   help="roles allowed to send custom code to this site (default, or the flag alone: nobody)")
    s.add_argument("--fork-jobs", action="store_true", help=FORK_HELP)
    v = sub.add_parser("server", help="configure the server kit")
    v.add_argument("kit")
    v.add_argument("--storage", help="folder for the job store and snapshots")
    v.add_argument("--no-allow-list", action="store_true")
    v.add_argument("--byoc-roles", nargs="*", metavar="ROLE", default=[],
                   help="roles whose code-carrying jobs the server accepts (default, or the flag alone: nobody)")
    v.add_argument("--heart-beat-timeout", type=float, metavar="S",
                   help="drop a site after S seconds without heartbeat (FLARE default 600; 60 recommended)")
    v.add_argument("--fork-jobs", action="store_true", help=FORK_HELP)
    j = sub.add_parser("stale-jobs", help="list (--finish: close) jobs left RUNNING by a killed server")
    j.add_argument("kit", help="the server's startup kit folder")
    j.add_argument("--finish", action="store_true", help=f"mark them {ABANDONED}")
    args = ap.parse_args(argv)

    if args.cmd == "stale-jobs":
        found = stale_jobs(args.kit, finish=args.finish)
        for job_id, status in found:
            print(f"{job_id}  {status}{'  -> ' + ABANDONED if args.finish else ''}")
        if not found:
            print("no stale jobs")
        return 0
    if not args.no_allow_list:
        path, removed = add_class_allow_list(args.kit)
        print(f"wrote {path}" + (f" (removed prefix entries {removed}: a prefix admits functions too)" if removed else ""))
    print(f"wrote {set_byoc(args.kit, args.byoc_roles)}")
    if args.fork_jobs:
        print(f"wrote {use_forked_job_launcher(args.kit)}")
    if args.cmd == "site":
        settings = {"data_dir": args.data_dir, "data_root": args.data_root, "checkpoint": args.checkpoint,
                    "checkpoint_dir": args.checkpoint_dir, "device": args.device, "threads": args.threads}
        if any(v is not None for v in settings.values()):
            print(f"wrote {write_site_config(args.kit, **settings)}")
    else:
        if args.storage:
            print(f"wrote {set_server_storage(args.kit, args.storage)}")
        if args.heart_beat_timeout is not None:
            print(f"wrote {set_server_liveness(args.kit, args.heart_beat_timeout)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
