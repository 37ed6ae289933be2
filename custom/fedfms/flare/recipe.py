"""FedFMS on FLARE's recipe API (FLARE 2.7+): ``FedFMSRecipe(variant, ...).execute(env)`` with ``SimEnv``, ``PocEnv``
or ``ProdEnv``, as FLARE's own examples start from ``FedAvgRecipe``.

The recipe is a thin wrapper of the one job builder: its job *is* :func:`fedfms.flare.fed_job.build_job` (a
:class:`fedfms.flare.fed_job.FedFMSJob`), so ``recipe.export(dir)`` writes exactly what ``fedfms job new`` writes (and
what is checked in under ``jobs/``), and an environment submits that same job. What differs per environment is
only what the environment needs around the job:

- ``SimEnv``: the simulated sites get this project's site policy before FLARE's ``SimEnv`` starts the simulator. FLARE's
  ``SimEnv`` installs FLARE's ``DEFAULT_CLASS_ALLOW_LIST`` into ``<workspace>/local/resources.json`` unless that file
  already holds a ``class_allow_list``; that default names stock FLARE classes only, so the simulated sites would refuse
  these jobs (no custom code: the production flavour). :meth:`FedFMSRecipe.process_env` writes the list a hospital
  sets for these jobs (:func:`fedfms.flare.fed_job.class_allow_list`, exact class names) and the sites' data folders
  (``local/fedfms_site.json``) with :func:`fedfms.flare.simulate.prepare_sim_workspace`, the same call
  ``fedfms simulate`` makes; ``SimEnv`` then sees a list and leaves it alone. ``extra={"data_root": FOLDER}`` (one
  prepared folder per site) sets ``$FEDFMS_DATA_ROOT`` for the simulated sites, as ``fedfms simulate --data-root`` does.
- ``PocEnv``: FLARE's POC provisions fresh kits with FLARE's default allow-list at every deploy, with no hook to set
  another, so the recipe ships this package as the job's custom code (the BYOC flavour, ``fedfms job export-byoc``),
  which POC's project admin may submit. ``extra={"data_root": FOLDER}`` as for ``SimEnv``.
- ``ProdEnv``: the job as it is (production flavour): the sites have ``fedfms`` installed and its classes allowed
  (``provisioning/site_setup.py``).

A run's truth is its run record, not FLARE's return code: :func:`run_outcome` reads it (exit code 0 only when every
round averaged every site, as ``fedfms simulate`` and ``fedfms report``).

Importing this module imports ``nvflare.recipe``, which removes ``--export`` and ``--export-dir`` from ``sys.argv``
(FLARE reserves them for ``Recipe.execute``); a script with its own ``--export`` parses its arguments first
(``jobs/job.py``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from nvflare.recipe import PocEnv, SimEnv
from nvflare.recipe.spec import ExecEnv, Recipe

from fedfms.errors import ConfigError
from fedfms.flare.jobs import job_recipe
from fedfms.flare.fed_job import build_job
from fedfms.flare.simulate import Outcome, prepare_sim_workspace
from fedfms.run_record import EXIT_FAILED, exit_code, read_run_record, summarize

DATA_ROOT = "data_root"  # the environments' extra property: one prepared site folder per site name


class FedFMSRecipe(Recipe):
    """A FedFMS job variant with its settings, as a FLARE recipe.

    Args:
        variant: a job variant (``fedfms.flare.jobs.VARIANTS``: fedmsa, fedsam, fedmsa_tiny, fednnunet, ...).
        **settings: the settings ``fedfms job new`` takes (``fedfms.flare.jobs.SETTING_KEYS``: ``num_rounds``,
            ``sites``, ``train``, ``model``, ``privacy``, ...).
    """

    def __init__(self, variant: str, **settings):
        self.variant = variant
        self.settings = {k: v for k, v in settings.items() if v is not None}
        self._byoc_dir: tempfile.TemporaryDirectory | None = None
        super().__init__(build_job(variant, **self.settings))

    @classmethod
    def from_job(cls, job_dir: str | os.PathLike) -> "FedFMSRecipe":
        """The recipe a job folder made by ``fedfms job new`` keeps in its ``meta.json``."""
        recipe = job_recipe(job_dir)
        if recipe is None:
            raise ConfigError(f"{job_dir}/meta.json has no recipe: the job was not made by `fedfms job new`")
        variant, settings = recipe
        return cls(variant, **settings)

    @property
    def job(self):
        """The :class:`fedfms.flare.fed_job.FedFMSJob` the recipe deploys."""
        return self._job

    @property
    def sites(self) -> list[str] | None:
        return self._job.sites

    def process_env(self, env: ExecEnv) -> None:
        if isinstance(env, SimEnv):
            self._prepare_simulation(env)
        elif isinstance(env, PocEnv):
            self._ship_package()

    def run(self, env: ExecEnv, server_exec_params: dict | None = None, client_exec_params: dict | None = None):
        with _data_root(env):
            return super().run(env, server_exec_params=server_exec_params, client_exec_params=client_exec_params)

    # -- environments -------------------------------------------------------------------------------------------
    def _prepare_simulation(self, env: SimEnv) -> None:
        clients = list(env.clients) if env.clients else [f"site-{i}" for i in range(1, env.num_clients + 1)]
        if self.sites and sorted(self.sites) != sorted(clients):
            raise ConfigError(f"recipe {self.name}: the job names sites {self.sites}, but SimEnv simulates {clients}; "
                              "give SimEnv(clients=...) the job's sites")
        data_root = env.get_extra_prop(DATA_ROOT)
        if data_root is not None and not Path(data_root).is_dir():
            raise ConfigError(f"SimEnv extra {DATA_ROOT!r} is {data_root!r}; expected the folder with one prepared "
                              "folder per site")
        with tempfile.TemporaryDirectory(prefix="fedfms-recipe-") as tmp:
            job_dir = self._job.write(Path(tmp) / "job")  # its data_dir and checkpoint folders join the site policy
            prepare_sim_workspace(Path(env.workspace_root) / self._job.name, job_dir, data_root)

    def _ship_package(self) -> None:
        """The package as the job's ``custom/fedfms`` (server and sites), as ``fedfms job export-byoc`` adds it. The
        recipe's job carries the code from then on (a later ``export`` too)."""
        if self._byoc_dir is not None:
            return
        self._byoc_dir = tempfile.TemporaryDirectory(prefix="fedfms-byoc-")
        package = Path(__file__).resolve().parents[1]
        shutil.copytree(package, Path(self._byoc_dir.name) / "fedfms",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # FedJob copies a folder's content into the app's custom/: this folder holds fedfms/
        self._job.to_server(self._byoc_dir.name)
        self._job.to_clients(self._byoc_dir.name)


@contextmanager
def _data_root(env: ExecEnv):
    """``$FEDFMS_DATA_ROOT`` (the jobs' default ``data_dir`` is ``$FEDFMS_DATA_ROOT/{site_name}``) for the site processes
    a local environment starts, restored afterwards."""
    data_root = env.get_extra_prop(DATA_ROOT)
    before = os.environ.get("FEDFMS_DATA_ROOT")
    if data_root is not None:
        os.environ["FEDFMS_DATA_ROOT"] = str(Path(data_root).resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FEDFMS_DATA_ROOT", None)
        else:
            os.environ["FEDFMS_DATA_ROOT"] = before


def run_outcome(run, timeout: float = 0.0):
    """The truthful outcome of a recipe's run (``nvflare.recipe.Run``): from the run record in the result folder,
    exit code 0 only when every round averaged every site (:class:`fedfms.flare.simulate.Outcome`)."""
    result = run.get_result(timeout=timeout)
    record = read_run_record(result) if result and Path(result).is_dir() else None
    if record is None:
        return Outcome(EXIT_FAILED, f"no run record in the result {result!r}: the job did not run to its end", None)
    return Outcome(exit_code(record), summarize(record), record)
