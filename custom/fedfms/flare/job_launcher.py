"""FLARE job launchers whose job processes are forked from a fork server instead of started as fresh interpreters.

A POC or production site starts one process per job (FLARE's ``ClientProcessJobLauncher``; the server one per job
too), and each spends 4-5 CPU-s importing torch, MONAI, segment-anything and FLARE before it does anything
(``bench/bench_site_start.py``). With these launchers the kit's parent process keeps one fork server
(:mod:`fedfms.flare.site_forkserver`, started when the parent starts, so its imports happen while the site waits for
work) and each job's process is a fork of it: the same command line, environment, working directory, standard
streams and exit code as FLARE's own launcher gives it, in its own session.

Opt-in, per kit (``site_setup.py site|server --fork-jobs``, ``fedfms_poc.py prepare --fork-jobs``): they replace the
kit's ``process_launcher`` component in ``local/resources.json``. A job that brings its own code (BYOC) whose
``custom/`` holds a module the fork server has imported, a fork server that is not there, or one that refuses, gets a
plain process, as FLARE starts it. Not used by the full-size rehearsal: in a simulation, a forked site process that
came up seconds after the previous one waited 600 s for the first chunk of a 357 MB model (a FLARE download race not
yet understood; :func:`fedfms.flare.simulate.watched_site_processes`)."""

from __future__ import annotations

import logging
import os
import shlex

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, JobConstants
from nvflare.app_common.job_launcher.client_process_launcher import ClientProcessJobLauncher
from nvflare.app_common.job_launcher.process_launcher import ProcessHandle
from nvflare.app_common.job_launcher.server_process_launcher import ServerProcessJobLauncher
from nvflare.utils.job_launcher_utils import add_custom_dir_to_path, get_credential_env
from nvflare.utils.process_utils import ProcessAdapter, spawn_process

from fedfms.flare.site_forkserver import ForkedProcess, ensure_fork_server

log = logging.getLogger(__name__)

CLIENT_JOB_MODULE = "nvflare.private.fed.app.client.worker_process"
SERVER_JOB_MODULE = "nvflare.private.fed.app.server.runner_process"
# what a job process imports before its first task (the executor: torch, MONAI, segment-anything, FLARE)
JOB_PRELOAD = ("fedfms.flare.executor", "torch._dynamo")


class _ForkingLauncher:
    job_module = ""

    def _preload(self) -> tuple[str, ...]:
        return (self.job_module, *JOB_PRELOAD)

    def launch_job(self, job_meta: dict, fl_ctx):
        # the environment and command FLARE's ProcessJobLauncher.launch_job builds
        env = os.environ.copy()
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        custom = workspace.get_app_custom_dir(job_meta.get(JobConstants.JOB_ID))
        if custom != "":
            add_custom_dir_to_path(custom, env)
        env.update(get_credential_env(fl_ctx.get_prop(FLContextKey.JOB_PROCESS_ARGS) or {}))
        argv = shlex.split(self.get_command(job_meta, fl_ctx), True)
        server = ensure_fork_server(self._preload())
        if server is not None:
            try:
                process = ForkedProcess(server.address, argv, env, os.getcwd())
                log.info("Launch the job in process ID: %s (forked from fork server %s)", process.pid, server.address)
                return ProcessHandle(process_adapter=ProcessAdapter(process=process))
            except (OSError, ValueError) as exc:
                log.info("job process started plainly: %s", exc)
        return ProcessHandle(process_adapter=spawn_process(argv, env))

    def handle_event(self, event_type: str, fl_ctx) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.SYSTEM_START:  # imports now, while the site waits for its first job
            ensure_fork_server(self._preload())


class ForkedClientJobLauncher(_ForkingLauncher, ClientProcessJobLauncher):
    """A site's job processes, forked (``process_launcher`` in a client kit's ``local/resources.json``)."""

    job_module = CLIENT_JOB_MODULE


class ForkedServerJobLauncher(_ForkingLauncher, ServerProcessJobLauncher):
    """The server's job processes, forked (``process_launcher`` in the server kit's ``local/resources.json``)."""

    job_module = SERVER_JOB_MODULE

