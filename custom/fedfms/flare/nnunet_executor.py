"""The site side of FednnU-Net: :class:`FedFMSExecutor` with two more tasks before training.

- at start: read the site's prepared folder into nnU-Net cases in this process (``NnUNetSiteData``; nothing is
  written, nothing leaves);
- ``nnunet_fingerprint``: send the site's fingerprint, only the agreed counts (checked here before sending);
- ``nnunet_plan``: build the trainer from the federation's plan (nnU-Net's planned network, loss, augmentation,
  schedule) and answer with the plan's digest;
- ``train`` / ``validate`` / ``submit_model``: the base executor's, around :class:`NnUNetSiteTrainer`; every update
  carries the plan digest where FedMSA's carry the frozen-encoder fingerprint, and the current round places the
  site on nnU-Net's poly learning-rate schedule.
"""

from __future__ import annotations

from pathlib import Path

import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedfms.errors import ConfigError
from fedfms.flare.replies import error_reply
from fedfms.flare.executor import FedFMSExecutor
from fedfms.flare.nnunet_tasks import DIGEST_KEY, FINGERPRINT_TASK, PLAN_KEY, PLAN_TASK
from fedfms.flare.site_config import resolve_site_settings
from fedfms.nnunet.config import NnUNetConfig, check_model_config
from fedfms.nnunet.evaluate import PLAN_FILE, read_plan, write_plan
from fedfms.nnunet.fingerprint import site_fingerprint
from fedfms.nnunet.sitedata import NnUNetSiteData
from fedfms.nnunet.plan import describe
from fedfms.nnunet.trainer import NnUNetSiteTrainer


class NnUNetExecutor(FedFMSExecutor):
    """Args: as :class:`FedFMSExecutor` (``train_config`` holds ``fedfms.nnunet.config.NnUNetConfig`` fields; its
    other arguments pass through), plus the names of the two planning tasks."""

    # *args and **kwargs: FLARE's Job API then reads the base class's arguments too (all of them are the base's)
    def __init__(self, *args, fingerprint_task_name: str = FINGERPRINT_TASK, plan_task_name: str = PLAN_TASK, **kwargs):
        super().__init__(*args, **kwargs)
        self.fingerprint_task_name, self.plan_task_name = fingerprint_task_name, plan_task_name
        self.task_names.update(fingerprint=fingerprint_task_name, plan=plan_task_name)
        self.site_data: NnUNetSiteData | None = None
        self.cfg: NnUNetConfig | None = None
        self._plan_path: Path | None = None

    def _setup(self, fl_ctx: FLContext) -> None:
        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_engine().get_workspace()
        local_dir = workspace.get_site_config_dir() if workspace else None
        settings = resolve_site_settings(site, {"data_dir": self.data_dir}, local_dir)
        model = check_model_config(self.model_config, f"{site} model_config")
        overrides = {k: settings[k] for k in ("device", "threads", "num_workers") if k in settings}
        self.cfg = NnUNetConfig.from_dict({**self.train_config, **overrides}, f"{site} train_config")
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        data = NnUNetSiteData(settings["data_dir"], self.cfg.val_fraction, self.cfg.split_seed)
        if data.num_classes != model.get("num_classes", 1):
            raise ConfigError(f"{settings['data_dir']}: the site has {data.num_classes} class(es) {data.classes}; "
                              f"the model config says num_classes={model.get('num_classes', 1)}")
        self.site_data = data
        if self.tb_writer_id:
            self.writer = fl_ctx.get_engine().get_component(self.tb_writer_id)
        self.log_info(fl_ctx, f"site {site}: data {settings['data_dir']} as {len(data)} nnU-Net cases "
                              f"({len(data.splits['train'])} train / {len(data.splits['val'])} val), "
                              f"{'grey' if data.grey else 'colour'}")
        self._plan_path = Path(workspace.get_run_dir(fl_ctx.get_job_id())) / PLAN_FILE if workspace else None
        if self._plan_path is not None and self._plan_path.is_file():
            # this job's plan arrived before this process started (FLARE's simulator runs a site's tasks in new
            # processes when it has fewer threads than sites; a restarted site does the same)
            self._build_trainer(read_plan(self._plan_path), fl_ctx, "received earlier in this job")
        else:
            self.log_info(fl_ctx, "waiting for the federation's nnU-Net plan")

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        planning = task_name in (self.task_names["fingerprint"], self.task_names["plan"])
        if self.site_data is None:
            return error_reply(ReturnCode.EXECUTION_EXCEPTION, self.setup_error or "the site's executor is not set up",
                               fatal=True)
        if planning:
            try:
                if task_name == self.task_names["fingerprint"]:
                    fingerprint = site_fingerprint(self.site_data)  # refuses anything outside the agreed fields
                    self.log_info(fl_ctx, f"sending the nnU-Net fingerprint: {fingerprint['num_cases']} cases, "
                                          f"fields {sorted(fingerprint)}")
                    return DXO(DataKind.STATISTICS, fingerprint).to_shareable()
                return self._receive_plan(shareable, fl_ctx)
            except Exception as exc:
                self.log_exception(fl_ctx, f"task {task_name} failed: {type(exc).__name__}: {exc}")
                return error_reply(ReturnCode.EXECUTION_EXCEPTION, f"{type(exc).__name__}: {exc}", fatal=True)
        if self.trainer is None:
            return error_reply(ReturnCode.EXECUTION_EXCEPTION, "no nnU-Net plan has reached this site (the job's "
                               "nnunet_planning workflow must run before training)", fatal=True)
        return super().execute(task_name, shareable, fl_ctx, abort_signal)

    def _receive_plan(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        plan = from_shareable(shareable).data[PLAN_KEY]
        self._build_trainer(plan, fl_ctx, "from the server")
        if self._plan_path is not None:  # kept in this job's run folder at the site, for a restarted process
            write_plan(plan, self._plan_path.parent)
        return DXO(DataKind.APP_DEFINED, {DIGEST_KEY: self.fingerprint}).to_shareable()

    def _build_trainer(self, plan: dict, fl_ctx: FLContext, where: str) -> None:
        self.trainer = NnUNetSiteTrainer(plan, self.cfg, self.site_data)
        self.fingerprint = self.trainer.digest  # sent with every update; the server compares it with its own
        self.log_info(fl_ctx, f"nnU-Net plan {self.fingerprint[:12]} ({where}): {describe(plan)}; device {self.trainer.device}")

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        # the round places this site's nnU-Net epochs on the federation's poly learning-rate schedule
        self.trainer.current_round = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0))
        return super()._train(shareable, fl_ctx, abort_signal)
