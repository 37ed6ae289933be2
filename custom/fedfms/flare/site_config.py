"""Where a site's data and SAM checkpoint live: decided by the site, not by the job.

One job runs unchanged at every hospital. The job carries defaults (``data_dir`` may contain
``{site_name}`` and ``$ENV_VARS``); a site overrides them in ``<site workspace>/local/fedfms_site.json``::

    {"data_dir": "/data/prostate/BIDMC", "checkpoint": "/models/sam_vit_b_01ec64.pth", "device": "cuda:0"}

``processes_per_site`` (a site with several GPUs: one DDP process per GPU, docs/multi-gpu.md) is a site fact too.

**A job cannot point a site anywhere else.** A path the job supplies (its ``data_dir`` or model checkpoint) is used
only when it is the shipped template (``$FEDFMS_DATA_ROOT/{site_name}``, ``$FEDFMS_SAM_CHECKPOINT``) or resolves,
symbolic links followed, inside a folder the site itself names: its ``data_dir`` / ``data_root`` (and
``$FEDFMS_DATA_ROOT``) for data, the folder of its ``checkpoint`` / its ``checkpoint_dir`` (and of
``$FEDFMS_SAM_CHECKPOINT``) for checkpoints, and the package's own shipped weights. Anything else is refused in one
line naming the argument. ``data_root`` and ``checkpoint_dir`` may be one folder or a list of folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedfms.errors import ConfigError

SITE_CONFIG_FILE = "fedfms_site.json"
SITE_KEYS = {"data_dir", "data_root", "checkpoint", "checkpoint_dir", "device", "threads", "num_workers",
             "processes_per_site"}
DEFAULT_DATA_DIR = "$FEDFMS_DATA_ROOT/{site_name}"
DEFAULT_CHECKPOINT = "$FEDFMS_SAM_CHECKPOINT"
# The package's own weights (the demo's pretrained tiny SAM): installed with the package, readable everywhere.
PACKAGE_ASSETS = Path(__file__).resolve().parents[1] / "assets"


def expand(value: str | None, site_name: str) -> str | None:
    if value is None:
        return None
    expanded = os.path.expanduser(os.path.expandvars(str(value).replace("{site_name}", site_name)))
    if "$" in expanded:
        var = expanded[expanded.index("$"):].split("/")[0]
        raise ConfigError(f"site {site_name}: {value!r} uses environment variable {var} which is not set; "
                          f"set it or give the path in local/{SITE_CONFIG_FILE}")
    return expanded


def read_site_config(local_dir: str | os.PathLike | None) -> dict:
    """The site's own settings, or {} if it has none. Unknown keys are an error (typos must not pass)."""
    if not local_dir:
        return {}
    path = Path(local_dir) / SITE_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object with keys {sorted(SITE_KEYS)}")
    unknown = sorted(set(data) - SITE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; expected some of {sorted(SITE_KEYS)}")
    for key in ("data_root", "checkpoint_dir"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list)
                                                                   and all(isinstance(v, str) for v in value))):
            raise ConfigError(f"{path}: field {key!r} is {value!r}; expected a folder or a list of folders")
    return data


def _folders(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def site_roots(site_file: dict, env: os._Environ | dict | None = None) -> dict[str, list[Path]]:
    """The folders this site lets a job's paths point into, by kind (``data``, ``checkpoint``), resolved."""
    env = os.environ if env is None else env
    data = [site_file.get("data_dir"), *_folders(site_file.get("data_root")), env.get("FEDFMS_DATA_ROOT")]
    checkpoint = [*_folders(site_file.get("checkpoint_dir")), PACKAGE_ASSETS]
    for file in (site_file.get("checkpoint"), env.get("FEDFMS_SAM_CHECKPOINT")):
        if file:
            checkpoint.append(Path(os.path.expanduser(str(file))).parent)
    resolve = lambda folders: list(dict.fromkeys(Path(os.path.expanduser(str(f))).resolve() for f in folders if f))
    return {"data": resolve(data), "checkpoint": resolve(checkpoint)}


def is_inside(path: str | os.PathLike, roots: list[Path]) -> bool:
    """Whether ``path`` (symbolic links and ``..`` resolved) is one of ``roots`` or below one."""
    real = Path(path).resolve()
    return any(real == root or root in real.parents for root in roots)


def confine(argument: str, value: str | None, template: str, roots: list[Path], site_name: str,
            site_key: str) -> str | None:
    """The job-supplied ``value`` of ``argument`` if the site allows it (the shipped ``template`` as it is, any other
    path expanded); else a one-line ConfigError naming the argument."""
    if value is None or value == "" or value == template:
        return value or None
    expanded = expand(value, site_name)
    if not Path(expanded).is_absolute():
        raise ConfigError(f"site {site_name}: the job's {argument} {value!r} is a relative path; expected an absolute "
                          f"path inside this site's {site_key} (local/{SITE_CONFIG_FILE})")
    if not roots:
        raise ConfigError(f"site {site_name}: the job's {argument} {value!r} cannot be checked: this site names no "
                          f"{site_key} in local/{SITE_CONFIG_FILE}; set it there (the site decides where its files are)")
    if not is_inside(expanded, roots):
        raise ConfigError(f"site {site_name}: the job's {argument} {value!r} is outside this site's {site_key} "
                          f"({', '.join(map(str, roots))}); the site's local/{SITE_CONFIG_FILE} decides where its "
                          "files are")
    return expanded


def confine_job_paths(site_name: str, job_defaults: dict, site_file: dict) -> dict:
    """The job's ``data_dir`` and ``checkpoint``, each checked against the site's folders (templates kept as they
    are: they expand from the site's own environment)."""
    roots = site_roots(site_file)
    return {
        "data_dir": confine("data_dir", job_defaults.get("data_dir", DEFAULT_DATA_DIR), DEFAULT_DATA_DIR, roots["data"],
                            site_name, "data_dir / data_root"),
        "checkpoint": confine("checkpoint", job_defaults.get("checkpoint"), DEFAULT_CHECKPOINT, roots["checkpoint"],
                              site_name, "checkpoint / checkpoint_dir"),
    }


def resolve_site_settings(site_name: str, job_defaults: dict, local_dir: str | os.PathLike | None,
                          pretrained: bool = True) -> dict:
    """Merge job defaults with the site file (the site wins) and expand ``{site_name}`` / ``$VARS``. Every path the
    job supplies is checked (:func:`confine_job_paths`), also where the site's own setting replaces it: a job that
    names a folder the site did not allow is not what it claims to be. A model with ``pretrained: false`` (random
    init, the paper's -PT ablation) loads no checkpoint: its ``checkpoint`` setting is dropped instead of expanded,
    so an unset ``$FEDFMS_SAM_CHECKPOINT`` does not stop the site."""
    site_file = read_site_config(local_dir)
    checked = {k: v for k, v in confine_job_paths(site_name, job_defaults, site_file).items() if v is not None}
    merged = {**{k: v for k, v in job_defaults.items() if v is not None}, **checked, **site_file}
    for key in ("data_root", "checkpoint_dir"):
        merged.pop(key, None)
    merged["data_dir"] = expand(merged.get("data_dir", DEFAULT_DATA_DIR), site_name)
    if not pretrained:
        merged["checkpoint"] = None
    elif merged.get("checkpoint"):
        merged["checkpoint"] = expand(merged["checkpoint"], site_name)
    return merged
