"""What a job may ask of a site: the argument check a site (and the server) installs in its own kit.

FLARE's ``class_allow_list`` decides *which classes* a job without custom code may instantiate; it cannot see
*what the arguments make them do*. A job could still name an allowed class and point it at the kit (its
``startup/`` certificates and keys, its ``local/`` policy files), at another folder on the machine, or have it
write outside the job's own run folder. :class:`JobArgumentGuard` closes that: ``site_setup.py`` adds it to the
kit's ``local/resources.json`` ``components``, FLARE hands it every component of a job before building it
(``BEFORE_BUILD_COMPONENT``), and it refuses the job, before anything of it runs, when

- a path-like argument (a ``/``, ``\\``, ``$``, ``~`` or ``..`` in it) does not resolve, symbolic links followed, inside
  the job's own run folder, or lies in the kit's ``startup/`` or ``local/`` folder;
- except for the arguments that read what the site itself placed: the executors' ``data_dir`` and model
  ``checkpoint`` (checked against the site's own folders, :func:`fedfms.flare.site_config.confine_job_paths`, the
  same rule the executor applies), and on the server the inputs of a resumed run (a previous run's folder in the
  server's workspace, never ``startup/`` or ``local/``).

Plain file names (no separator) pass: each component places them in its own folder. Jobs carrying custom code are
left to FLARE's BYOC right, as FLARE's own allow-list check does.
"""

from __future__ import annotations

import os
from pathlib import Path

from nvflare.apis.app_validation import AppValidationKey
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from fedfms.errors import ConfigError
from fedfms.flare.site_config import (
    DEFAULT_CHECKPOINT,
    DEFAULT_DATA_DIR,
    confine,
    is_inside,
    read_site_config,
    site_roots,
)

EXECUTORS = ("fedfms.flare.executor.FedFMSExecutor", "fedfms.flare.nnunet_executor.NnUNetExecutor")
MONITORS = ("fedfms.flare.monitor.FederationMonitor", "fedfms.flare.he_server.HEFederationMonitor")
# (component class, argument as a dotted key) -> what the argument reads
SITE_PATHS: dict[tuple[str, str], str] = {
    **{(e, "data_dir"): "data" for e in EXECUTORS},
    ("fedfms.flare.global_model.TravelSetModel", "checkpoint"): "checkpoint",
    ("nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor", "source_ckpt_file_full_name"): "previous_run",
    **{(m, "resume.record"): "previous_run" for m in MONITORS},
    **{(m, "resume.best_model"): "previous_run" for m in MONITORS},
}
TEMPLATES = {"data": DEFAULT_DATA_DIR, "checkpoint": DEFAULT_CHECKPOINT}


def path_kind(component: str, key: str) -> str | None:
    """What the argument ``key`` of ``component`` reads: every fedfms component's ``model_config.checkpoint`` (the
    executors, the site and server filters that build the model) is the SAM checkpoint."""
    if key == "model_config.checkpoint" and component.startswith("fedfms."):
        return "checkpoint"
    return SITE_PATHS.get((component, key))


def looks_like_path(value: str) -> bool:
    return any(c in value for c in "/\\$") or value.startswith("~") or value == ".." or value.startswith("file:")


def _strings(node, key: str = ""):
    """(dotted key, string) of every string in a component's arguments; nested components are skipped (FLARE
    hands each of them to the guard on its own)."""
    if isinstance(node, dict):
        if key and ("path" in node or "class_path" in node):
            return
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def check_component(path: str, args: dict, *, site: str, run_dir: str | Path, kit_root: str | Path,
                    site_file: dict | None = None) -> str | None:
    """Why the component ``path`` with ``args`` may not run at this site, in one line; None when it may."""
    run_dir, kit_root = Path(run_dir).resolve(), Path(kit_root).resolve()
    kit_private = [kit_root / "startup", kit_root / "local"]
    site_file = site_file or {}
    roots = site_roots(site_file)
    for key, value in _strings(args or {}):
        kind = path_kind(path, key)
        where = f"{path} argument {key!r} = {value!r}"
        if kind in ("data", "checkpoint"):
            try:
                checked = confine(key, value, TEMPLATES[kind], roots[kind], site, f"{kind} folders")
            except ConfigError as exc:
                return f"{where}: {exc}"
            if checked is None or checked == TEMPLATES[kind]:
                continue
            value = checked
        elif kind is None and not looks_like_path(value):
            continue
        if "$" in value or value.startswith("~"):
            return f"{where}: environment variables and ~ are not accepted in a job's paths"
        if not os.path.isabs(value):
            return f"{where}: a relative path with folders; give a plain file name or an absolute path in the job's run folder"
        if is_inside(value, kit_private) or Path(value).resolve() == kit_root:
            return f"{where}: points at the kit itself (its folder, startup/ or local/)"
        if kind in ("data", "checkpoint"):
            continue  # inside the site's own folders (confine)
        if kind == "previous_run":
            if not is_inside(value, [kit_root]):
                return f"{where}: a resumed run's files must be in this server's workspace ({kit_root})"
            continue
        if not is_inside(value, [run_dir]):
            return f"{where}: outside the job's run folder {run_dir}"
    return None


class JobArgumentGuard(FLComponent):
    """Installed in a kit's ``local/resources.json`` (``site_setup.py``); refuses a job whose component arguments
    reach outside what :func:`check_component` allows, before any of its components is built."""

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != EventType.BEFORE_BUILD_COMPONENT:
            return
        meta = fl_ctx.get_prop(FLContextKey.JOB_META)
        if isinstance(meta, dict) and meta.get(AppValidationKey.BYOC):
            return  # code-carrying jobs: FLARE's BYOC right decides (the site grants it or not)
        config = fl_ctx.get_prop(FLContextKey.COMPONENT_CONFIG)
        if not isinstance(config, dict):
            return
        path = config.get("path") or config.get("class_path")
        if not isinstance(path, str):
            return
        reason = self.reason(path, config.get("args"), fl_ctx)
        if reason:
            self.log_error(fl_ctx, f"job refused: {reason}", fire_event=False)
            fl_ctx.set_prop(FLContextKey.COMPONENT_BUILD_ERROR, f"fedfms job guard: {reason}", private=True, sticky=False)

    @staticmethod
    def reason(path: str, args, fl_ctx: FLContext) -> str | None:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        job_id = fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID) or fl_ctx.get_job_id()
        if workspace is None or not job_id:
            return "cannot check the job's arguments (no workspace or job id)"
        site = fl_ctx.get_identity_name() or fl_ctx.get_prop(FLContextKey.CLIENT_NAME) or "server"
        try:
            site_file = read_site_config(workspace.get_site_config_dir())
        except ConfigError as exc:
            return str(exc)
        return check_component(path, args if isinstance(args, dict) else {}, site=site,
                               run_dir=workspace.get_run_dir(job_id), kit_root=workspace.get_root_dir(),
                               site_file=site_file)
