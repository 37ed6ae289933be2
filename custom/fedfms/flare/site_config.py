"""Where a site's data and SAM checkpoint live: decided by the site, not by the job.

One job runs unchanged at every hospital. The job carries defaults (``data_dir`` may contain
``{site_name}`` and ``$ENV_VARS``); a site overrides them in ``<site workspace>/local/fedfms_site.json``::

    {"data_dir": "/data/prostate/BIDMC", "checkpoint": "/models/sam_vit_b_01ec64.pth", "device": "cuda:0"}

``processes_per_site`` (a site with several GPUs: one DDP process per GPU, docs/multi-gpu.md) is a site fact too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedfms.errors import ConfigError

SITE_CONFIG_FILE = "fedfms_site.json"
SITE_KEYS = {"data_dir", "checkpoint", "device", "threads", "num_workers", "processes_per_site"}
DEFAULT_DATA_DIR = "$FEDFMS_DATA_ROOT/{site_name}"
DEFAULT_CHECKPOINT = "$FEDFMS_SAM_CHECKPOINT"


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
    return data


def resolve_site_settings(site_name: str, job_defaults: dict, local_dir: str | os.PathLike | None,
                          pretrained: bool = True) -> dict:
    """Merge job defaults with the site file (the site wins) and expand ``{site_name}`` / ``$VARS``. A model with
    ``pretrained: false`` (random init, the paper's -PT ablation) loads no checkpoint: its ``checkpoint`` setting is
    dropped instead of expanded, so an unset ``$FEDFMS_SAM_CHECKPOINT`` does not stop the site."""
    merged = {**{k: v for k, v in job_defaults.items() if v is not None}, **read_site_config(local_dir)}
    merged["data_dir"] = expand(merged.get("data_dir", DEFAULT_DATA_DIR), site_name)
    if not pretrained:
        merged["checkpoint"] = None
    elif merged.get("checkpoint"):
        merged["checkpoint"] = expand(merged["checkpoint"], site_name)
    return merged
