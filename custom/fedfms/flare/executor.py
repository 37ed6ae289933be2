"""The site's FLARE Executor: translates FLARE tasks into calls of the plain :class:`LocalTrainer`."""

from __future__ import annotations

import inspect
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedfms.errors import ConfigError
from fedfms.flare.replies import error_reply
from fedfms.flare.site_config import resolve_site_settings
from fedfms.flare.site_progress import ProgressReporter
from fedfms.flare.update_check import FROZEN_FINGERPRINT
from fedfms.models import ModelConfig, frozen_fingerprint
from fedfms.numbers import finite_or_none
from fedfms.training.distributed import OPTIMIZER_FILE, RoundAborted, check_processes_per_site, launch_round
from fedfms.training.personal import PERSONAL_DIR, Personalisation, personalise_site, read_local_part, save_local_part
from fedfms.training.trainer import LocalTrainer, TrainConfig, WeightsMismatch

KEY_METRIC = "val_dice"


def dxo_to_tensors(dxo: DXO) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in dxo.data.items()}


def tensors_to_numpy(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in weights.items()}


def _round_dir(fl_ctx: FLContext, workspace, site: str) -> str:
    """Where the multi-process rounds keep their files and rank logs: ``fedfms_ddp`` in the job's run folder of the
    site's workspace (beside FLARE's own log), or a temporary folder when there is none."""
    job_id = fl_ctx.get_job_id()
    if workspace is not None and job_id and hasattr(workspace, "get_run_dir"):
        path = Path(workspace.get_run_dir(job_id)) / "fedfms_ddp"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    return tempfile.mkdtemp(prefix=f"fedfms_ddp_{site}_")


def _personal_dir(fl_ctx: FLContext, workspace, site: str) -> str:
    """Where a personalised job keeps this site's local part and its models: ``fedfms_personal`` in the job's run
    folder of the site's workspace (a temporary folder when there is none)."""
    job_id = fl_ctx.get_job_id()
    if workspace is not None and job_id and hasattr(workspace, "get_run_dir"):
        return str(Path(workspace.get_run_dir(job_id)) / PERSONAL_DIR)
    return tempfile.mkdtemp(prefix=f"fedfms_personal_{site}_")


class FedFMSExecutor(Executor):
    """Tasks: ``train`` (load global travel set, fit locally, return the new travel set weighted by the
    number of training samples), ``validate`` (Dice/IoU of a received model on this site's data) and
    ``submit_model`` (this site's current travel set, for cross-site evaluation); in a personalised job also
    ``personalise`` (after the last round: fedfms.training.personal.personalise_site; only scores leave the site).

    A personalised job's local part (``model_config["local_parts"]``) never leaves the site: a received model is
    its shared part, loaded beside the site's own local part (so ``validate`` scores a global model *with this
    site's local part*), and the local part is kept on disk after every round (``fedfms_personal/`` in the site's
    run folder) so that a site process started again goes on with it.

    Args:
        model_config: :class:`fedfms.models.ModelConfig` fields.
        train_config: :class:`fedfms.training.trainer.TrainConfig` fields.
        data_dir: default location of this site's prepared data; ``{site_name}`` and ``$VARS`` are expanded.
            The site's ``local/fedfms_site.json`` overrides it (and ``checkpoint``, ``device``, ...).
        validation_split: which part of the site's data ``validate`` scores ("val" or "all").
        tb_writer_id: optional ``TBWriter`` component for streaming per-round metrics to the server.
        transfer: "float32" or "float16": how the job sends models (for the bytes-sent figure it tracks).
        update: "weights" (the trained travel set) or "weight_diff" (its difference to the received global model,
            which FLARE's differential-privacy filters work on).
        processes_per_site: 1 (train in this process, as always) or N > 1: each ``train`` task runs the round as N
            PyTorch DDP processes under ``torchrun`` (one per GPU, ``cuda:LOCAL_RANK``; gloo processes on a CPU) and
            sends rank 0's result: the same update and the same single sample count (docs/multi-gpu.md). A site's
            ``local/fedfms_site.json`` may set its own ``processes_per_site`` (how many GPUs it has).
        round_timeout_s: upper bound on one multi-process round; its processes are ended after it (None: none).
        personalise: the job's ``personalise`` setting (fedfms.training.personal.Personalisation), or None.
        alone_epochs: with ``personalise`` holding ``alone``: the site-alone model's epochs (rounds x local epochs).
    """

    def __init__(
        self,
        model_config: dict,
        train_config: dict | None = None,
        data_dir: str | None = None,
        validation_split: str = "val",
        tb_writer_id: str | None = "tb_writer",
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
        transfer: str = "float32",
        update: str = "weights",
        processes_per_site: int = 1,
        round_timeout_s: float | None = None,
        personalise: str | None = None,
        alone_epochs: int = 0,
        personalise_task_name: str = "personalise",
    ):
        super().__init__()
        self.model_config = dict(model_config)
        self.train_config = dict(train_config or {})
        self.data_dir = data_dir
        self.validation_split = validation_split
        self.tb_writer_id = tb_writer_id
        self.transfer = transfer
        self.bytes_factor = 0.5 if transfer == "float16" else 1.0
        self.update = update
        if update not in ("weights", "weight_diff"):
            raise ValueError(f"update is {update!r}; expected 'weights' or 'weight_diff'")
        self.update_kind = DataKind.WEIGHT_DIFF if update == "weight_diff" else DataKind.WEIGHTS
        self.processes_per_site = check_processes_per_site(processes_per_site, "processes_per_site")
        self.round_timeout_s = round_timeout_s
        self.processes = self.processes_per_site  # after _setup: the site's own setting, if it has one
        self.round_inputs: dict | None = None  # what each multi-process round is built from (_setup)
        self.work_dir: str | None = None
        self.train_task_name, self.validate_task_name = train_task_name, validate_task_name
        self.submit_model_task_name = submit_model_task_name
        self.task_names = {"train": train_task_name, "validate": validate_task_name, "submit": submit_model_task_name}
        self.personalise = personalise
        self.personalisation = Personalisation.parse(personalise, "executor personalise")
        self.alone_epochs = int(alone_epochs)
        self.personalise_task_name = personalise_task_name
        if self.personalisation is not None:
            self.task_names["personalise"] = personalise_task_name
        self.personal_dir: str | None = None
        self.initial_weights: dict | None = None  # the site-alone comparison's start (personalise "alone")
        self.trainer: LocalTrainer | None = None
        self.setup_error: str | None = None
        self.fingerprint: str | None = None
        self.writer = None
        self.progress: ProgressReporter | None = None  # the site's reports to the server (fedfms.flare.liveness)
        self._upload_started = self._result_mb = self._result_round = None  # the last training result's upload

    # ------------------------------------------------------------------ set-up
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            # reports from the job's first second: the server waits for this site while it reports, however slow
            self.progress = ProgressReporter(fl_ctx.get_engine(), fl_ctx.get_identity_name())
            self.progress.start()
            try:
                self._setup(fl_ctx)
            except Exception as exc:
                # A site that cannot start says why, in one line, in its reply to every task: the server then
                # stops the job at once with that reason (a panic here would only stop this site, and the
                # server would wait for it).
                self.setup_error = f"{type(exc).__name__}: {exc}"
                self.log_error(fl_ctx, f"this site cannot run the job: {self.setup_error}")
            self.progress.phase("idle")
        elif event_type == EventType.BEFORE_SEND_TASK_RESULT:
            self._upload_started = time.monotonic()
        elif event_type == EventType.AFTER_SEND_TASK_RESULT and self.progress is not None:
            if self._upload_started is not None and self._result_mb is not None:
                self.progress.transfer(upload_s=time.monotonic() - self._upload_started, upload_mb=self._result_mb,
                                       upload_round=self._result_round)
            self._upload_started = self._result_mb = None
            self.progress.phase("idle")
        elif event_type == EventType.END_RUN and self.progress is not None:
            self.progress.stop()

    def _setup(self, fl_ctx: FLContext) -> None:
        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_engine().get_workspace()
        local_dir = workspace.get_site_config_dir() if workspace else None
        defaults = {"data_dir": self.data_dir, "checkpoint": self.model_config.get("checkpoint")}
        settings = resolve_site_settings(site, defaults, local_dir, pretrained=self.model_config.get("pretrained", True))
        model_cfg = ModelConfig.from_dict({**self.model_config, "checkpoint": settings.get("checkpoint")}, f"{site} model_config")
        overrides = {k: settings[k] for k in ("device", "threads", "num_workers") if k in settings}
        train_cfg = TrainConfig.from_dict({**self.train_config, **overrides}, f"{site} train_config")
        self.trainer = LocalTrainer(model_cfg, train_cfg, settings["data_dir"])
        self.processes = check_processes_per_site(settings.get("processes_per_site", self.processes_per_site),
                                          f"site {site}: processes_per_site")
        if self.processes > 1:
            self.round_inputs = {"model_config": model_cfg.to_dict(), "train_config": train_cfg.to_dict(),
                                 "site_dir": settings["data_dir"]}
            self.work_dir = _round_dir(fl_ctx, workspace, site)
        self.fingerprint = frozen_fingerprint(self.trainer.model, model_cfg.mode)
        if self.personalisation is not None or model_cfg.local_parts:
            self._setup_personal(fl_ctx, workspace, site, model_cfg)
        if self.tb_writer_id:
            self.writer = fl_ctx.get_engine().get_component(self.tb_writer_id)
        self.log_info(
            fl_ctx,
            f"site {site}: data {settings['data_dir']} ({self.trainer.num_train_samples} train / "
            f"{len(self.trainer.datasets['val'])} val samples), mode {model_cfg.mode}, variant {model_cfg.variant}, "
            f"device {self.trainer.device}"
            + (f", {self.processes} DDP processes per round (logs under {self.work_dir}/logs)" if self.processes > 1 else ""),
        )

    def _setup_personal(self, fl_ctx: FLContext, workspace, site: str, model_cfg: ModelConfig) -> None:
        if model_cfg.local_parts and self.processes > 1:
            raise ConfigError(f"site {site}: processes_per_site is {self.processes}, but the job keeps "
                              f"{', '.join(model_cfg.local_parts)} at each site: personalised jobs train in one process per site")
        self.personal_dir = _personal_dir(fl_ctx, workspace, site)
        if self.personalisation is not None and self.personalisation.alone:
            self.initial_weights = self.trainer.trained_weights()
        saved = read_local_part(self.personal_dir) if model_cfg.local_parts else None
        if saved is not None:
            self.trainer.load_local_weights(saved)
            self.log_info(fl_ctx, f"site {site}: continuing with its local part from {self.personal_dir}")

    # ------------------------------------------------------------------ tasks
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.trainer is None:
            return error_reply(ReturnCode.EXECUTION_EXCEPTION, self.setup_error or "the site's executor is not set up", fatal=True)
        try:
            if task_name == self.task_names["train"]:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == self.task_names["validate"]:
                return self._validate(shareable, fl_ctx)
            if task_name == self.task_names["submit"]:
                return DXO(DataKind.WEIGHTS, tensors_to_numpy(self.trainer.travel_weights())).to_shareable()
            if task_name == self.task_names.get("personalise"):
                return self._personalise(shareable, fl_ctx, abort_signal)
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except WeightsMismatch as exc:
            self.log_error(fl_ctx, f"rejected incoming model: {exc}")
            return error_reply(ReturnCode.BAD_TASK_DATA, f"the site rejected the global model: {exc}")
        except Exception as exc:
            self.log_exception(fl_ctx, f"task {task_name} failed: {type(exc).__name__}: {exc}")
            return error_reply(ReturnCode.EXECUTION_EXCEPTION, f"task {task_name} failed at the site: {type(exc).__name__}: {exc}")

    def _incoming(self, shareable: Shareable) -> dict[str, torch.Tensor]:
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            raise WeightsMismatch(f"expected DataKind.WEIGHTS, got {dxo.data_kind}")
        return dxo_to_tensors(dxo)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
        received_at = time.time()
        incoming = self._incoming(shareable)
        if self.progress is not None:
            self.progress.transfer(task_at=received_at, task_round=int(current_round),
                                   task_mb=sum(v.numel() * v.element_size() for v in incoming.values()) * self.bytes_factor / 1e6)
        self._report("train", current_round)
        if self.processes > 1:
            try:
                result = self._train_distributed(incoming, abort_signal)
            except RoundAborted:
                return make_reply(ReturnCode.TASK_ABORTED)
        else:
            result = self.trainer.train_round(incoming, should_abort=lambda: abort_signal.triggered,
                                              **self._progress_kwargs(self.trainer.train_round))
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        if getattr(self.trainer, "local_parts", ()):  # (the nnU-Net baseline's trainer has no local part)
            save_local_part(self.personal_dir, self.trainer.local_weights())
        self._report("send")
        val = result.metrics.get("val_before", {})
        initial = {KEY_METRIC: finite_or_none(val.get("dice")), "val_iou": finite_or_none(val.get("iou"))}
        weights = tensors_to_numpy(result.weights)
        if self.update_kind == DataKind.WEIGHT_DIFF:
            start = tensors_to_numpy(incoming)
            weights = {k: v - start[k] for k, v in weights.items()}
        self._stream(current_round, result, weights)
        meta = {
            MetaKey.NUM_STEPS_CURRENT_ROUND: result.num_samples,  # FedAvg weight n_k (see aggregator)
            MetaKey.INITIAL_METRICS: {k: v for k, v in initial.items() if v is not None},
            FROZEN_FINGERPRINT: self.fingerprint,
        }
        self.log_info(fl_ctx, f"round {current_round}: loss {result.metrics['train']['loss']:.4f}, "
                              f"global model val Dice {initial[KEY_METRIC]}, n={result.num_samples}")
        reply = DXO(self.update_kind, weights, meta=meta).to_shareable()
        reply.set_header(AppConstants.CURRENT_ROUND, current_round)  # lets result filters and logs name the round
        self._result_mb = sum(v.nbytes for v in weights.values()) * self.bytes_factor / 1e6
        self._result_round = int(current_round)
        return reply

    def _train_distributed(self, incoming: dict[str, torch.Tensor], abort_signal: Signal):
        """The round as ``self.processes`` DDP processes (fedfms.training.distributed); the in-process trainer then
        takes the result, so that ``validate`` and ``submit_model`` see the trained model and the next round
        continues from it (its shuffle seed, Adam's moments)."""
        if self.round_inputs is None:  # a subclass with its own trainer and set-up (nnU-Net's) has no DDP round
            raise ConfigError(f"processes_per_site={self.processes}: {type(self).__name__} trains in one process only")
        self.trainer.load_travel_weights(incoming)  # checks the incoming travel set here, before any process starts
        optimizer = f"{self.work_dir}/{OPTIMIZER_FILE}" if self.trainer.rounds_done else None
        result = launch_round(**self.round_inputs, global_weights=incoming, nproc=self.processes, work_dir=self.work_dir,
                              rounds_done=self.trainer.rounds_done, optimizer_state=optimizer,
                              timeout_s=self.round_timeout_s, should_abort=lambda: abort_signal.triggered)
        self.trainer.load_travel_weights(result.weights)
        self.trainer.rounds_done += 1
        return result

    def _personalise(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """The final global model (its shared part) in; this site's scores of the global, personalised (and
        site-alone) models on its validation split out, nothing of the models: they stay in ``fedfms_personal/``."""
        site = fl_ctx.get_identity_name()
        result = personalise_site(self.trainer, self._incoming(shareable), self.personalisation, self.personal_dir,
                                  alone_epochs=self.alone_epochs, initial_weights=self.initial_weights, site=site,
                                  should_abort=lambda: abort_signal.triggered)
        if result.get("aborted") or abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        line = ", ".join(f"{kind} Dice {result[kind]['dice']}" for kind in ("global", "personal", "alone") if kind in result)
        self.log_info(fl_ctx, f"personalised ({self.personalisation}): {line}; models in {self.personal_dir}")
        return DXO(DataKind.METRICS, result).to_shareable()

    def _report(self, phase: str, round_=None) -> None:
        if self.progress is not None:
            self.progress.phase(phase, round_)

    def _progress_kwargs(self, method) -> dict:
        """``on_progress`` for the trainer's method when it takes one (the nnU-Net trainer's does not)."""
        if self.progress is None or "on_progress" not in inspect.signature(method).parameters:
            return {}
        return {"on_progress": self.progress.samples}

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        incoming = self._incoming(shareable)
        model_owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        own = self.trainer.travel_weights()  # detached copies
        self._report("validate")
        try:
            self.trainer.load_travel_weights(incoming)
            metrics = self.trainer.evaluate(self.validation_split, **self._progress_kwargs(self.trainer.evaluate))
        finally:
            self.trainer.load_travel_weights(own)
            self._report("send")
        report = {
            "dice": finite_or_none(metrics.get("dice")),
            "iou": finite_or_none(metrics.get("iou")),
            "volume_dice": finite_or_none(metrics.get("volume_dice")),
            "volume_iou": finite_or_none(metrics.get("volume_iou")),
            # the paper code's rule beside the project's (docs/evaluation.md): per slice, empty/empty = 1
            "dice_reference": finite_or_none(metrics.get("dice_reference")),
            "iou_reference": finite_or_none(metrics.get("iou_reference")),
            "num_samples": metrics["num_samples"],
        }
        for name, d, i in zip(metrics["classes"], metrics.get("dice_per_class", []), metrics.get("iou_per_class", [])):
            report[f"dice_{name}"], report[f"iou_{name}"] = finite_or_none(d), finite_or_none(i)
        for name, d, i in zip(metrics["classes"], metrics.get("dice_reference_per_class", []),
                              metrics.get("iou_reference_per_class", [])):
            report[f"dice_reference_{name}"], report[f"iou_reference_{name}"] = finite_or_none(d), finite_or_none(i)
        self.log_info(fl_ctx, f"validated model from {model_owner} on {self.validation_split}: {report}")
        return DXO(DataKind.METRICS, report).to_shareable()

    def _stream(self, step: int, result, weights: dict) -> None:
        """Per-round tracking through FLARE's writer (TensorBoard or MLflow at the server): the training loss,
        the received global model's validation Dice/IoU (overall and per class), the learning rate, the
        samples, the round's local seconds and the megabytes this result puts on the wire."""
        if self.writer is None:
            return
        step = int(step)
        train, val = result.metrics.get("train", {}), result.metrics.get("val_before", {})
        scalars = {"train_loss": train.get("loss"), "seconds": train.get("seconds"), "steps": train.get("steps"),
                   "samples": result.num_samples, "lr": self.trainer.optimizer.param_groups[0]["lr"],
                   KEY_METRIC: val.get("dice"), "val_iou": val.get("iou"),
                   "upload_mb": sum(v.nbytes for v in weights.values()) * self.bytes_factor / 1e6}
        for name, d, i in zip(val.get("classes", []), val.get("dice_per_class", []), val.get("iou_per_class", [])):
            scalars[f"val_dice_{name}"], scalars[f"val_iou_{name}"] = d, i
        for tag, value in scalars.items():
            value = finite_or_none(value)
            if value is not None:
                self.writer.add_scalar(tag, value, global_step=step)
