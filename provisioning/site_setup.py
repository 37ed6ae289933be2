#!/usr/bin/env python3
"""Site-local configuration of a FedFMS startup kit, done once by each hospital after unpacking its kit.

    # hospital site: allow the pre-installed fedfms package, say where the data and checkpoint are
    python provisioning/site_setup.py site /opt/fedfms/hospital-a \
        --data-dir /data/fedfms/prepared --checkpoint /models/sam_vit_b_01ec64.pth

    # server: allow fedfms components, keep job storage on a persistent disk instead of /tmp/nvflare
    python provisioning/site_setup.py server /opt/fedfms/fl.fedfms.example.org --storage /srv/fedfms

Everything written lives in the kit's ``local/`` folder, which re-provisioning never overwrites:
``resources.json`` (class_allow_list, storage), ``fedfms_site.json`` (data/checkpoint),
``authorization.json`` (who may send custom code). Only the standard library is used, so this runs
before anything else is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

ALLOW_PREFIX = "fedfms."
# What the production jobs need beyond the provisioned default list: this package (by prefix) and the one
# stock class the jobs use that FLARE's default list lacks.
ALLOW_ENTRIES = [ALLOW_PREFIX, "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"]
SITE_CONFIG = "fedfms_site.json"
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
    """Entries for the installed fedfms version's jobs (its own list when importable, else the static one)."""
    try:
        from fedfms.flare.jobs import class_allow_list
    except ImportError:
        return list(ALLOW_ENTRIES)
    return list(dict.fromkeys(ALLOW_ENTRIES + class_allow_list()))


def add_class_allow_list(kit: str | Path, prefixes: Iterable[str] | None = None) -> Path:
    """Add allow-list entries (default: what the fedfms production jobs need) to ``local/resources.json``,
    keeping the provisioned NVFlare entries and everything else the site configured. Prefix entries end
    with a dot (``"fedfms."``)."""
    prefixes = fedfms_allow_entries() if prefixes is None else list(prefixes)
    local = _local(kit)
    resources = _load_local(local, "resources.json")
    allow = list(resources.get("class_allow_list", []))
    allow += [p for p in prefixes if p not in allow]
    resources["class_allow_list"] = allow
    resources.setdefault("class_list_enforcement_mode", "enforce")
    path = local / "resources.json"
    path.write_text(json.dumps(resources, indent=2) + "\n")
    return path


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


def write_site_config(kit: str | Path, **settings) -> Path:
    """``local/fedfms_site.json``: this site's data folder, SAM checkpoint, device, threads. The executor
    reads it at job start and it wins over the job's defaults, so one job runs unchanged everywhere."""
    local = _local(kit)
    path = local / SITE_CONFIG
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update({k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items() if v is not None})
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("site", help="configure a hospital's client kit")
    s.add_argument("kit", help="the unpacked startup kit folder (contains startup/ and local/)")
    s.add_argument("--data-dir", help="the site's prepared data folder")
    s.add_argument("--checkpoint", help="SAM checkpoint (.pth) on this machine")
    s.add_argument("--device", help="e.g. cuda:0 or cpu")
    s.add_argument("--threads", type=int, help="torch CPU threads for training")
    s.add_argument("--no-allow-list", action="store_true", help="leave class_allow_list as provisioned")
    s.add_argument("--byoc-roles", nargs="*", metavar="ROLE",
                   help="roles allowed to send custom code to this site (none given: nobody)")
    v = sub.add_parser("server", help="configure the server kit")
    v.add_argument("kit")
    v.add_argument("--storage", help="folder for the job store and snapshots")
    v.add_argument("--no-allow-list", action="store_true")
    args = ap.parse_args(argv)

    if not args.no_allow_list:
        print(f"wrote {add_class_allow_list(args.kit)}")
    if args.cmd == "site":
        settings = {"data_dir": args.data_dir, "checkpoint": args.checkpoint, "device": args.device,
                    "threads": args.threads}
        if any(v is not None for v in settings.values()):
            print(f"wrote {write_site_config(args.kit, **settings)}")
        if args.byoc_roles is not None:
            print(f"wrote {set_byoc(args.kit, args.byoc_roles)}")
    elif args.storage:
        print(f"wrote {set_server_storage(args.kit, args.storage)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
