"""A site's nnU-Net trainer with the :class:`fedfms.training.trainer.LocalTrainer` interface (weights in,
weights + sample count + metrics out), built from nnU-Net v2's own pieces; it knows nothing of FLARE.

What is nnU-Net's, called as nnU-Net calls it (``nnUNetTrainer``'s methods run on this object, which carries
the attributes they read):

- the network: the plan's 2D ``PlainConvUNet`` (``get_network_from_plans``), deep supervision on in training;
- the loss: ``nnUNetTrainer._build_loss`` -- Dice + cross-entropy (``DC_and_CE_loss``; Dice + BCE for
  region plans) with batch Dice, wrapped for deep supervision with nnU-Net's weights;
- the data: ``nnUNetDataLoader`` (random cases, patches with 33 % foreground oversampling, nnU-Net's
  padding) over the site's cases preprocessed by ``DefaultPreprocessor``;
- the augmentation: ``nnUNetTrainer.get_training_transforms`` with the rotation, scaling and mirroring
  ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` chooses for the plan's patch;
- the optimiser and schedule: ``nnUNetTrainer.configure_optimizers`` -- SGD, Nesterov momentum 0.99,
  weight decay 3e-5, ``PolyLRScheduler`` (lr x (1 - epoch / epochs)^0.9) stepped once per nnU-Net epoch;
- the step: ``nnUNetTrainer.train_step`` (float16 autocast and GradScaler on CUDA, gradient norm clipped at 12);
- inference: ``nnUNetPredictor`` (:mod:`fedfms.nnunet.inference`).

What is the federation's: an nnU-Net *epoch* (``iterations_per_epoch`` iterations) is the unit of local work,
``epochs`` of them per round; the poly schedule runs over the whole federation (round r, local epoch e is
nnU-Net epoch ``r * epochs + e`` of ``total_epochs``), so every site uses the same learning rate in a round;
SGD's momentum stays at the site between rounds (as Adam's moments do in ``LocalTrainer``). Validation is
the project's: Dice/IoU of whole cases of the site's validation split under both scoring rules.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from fedfms.nnunet.config import NnUNetConfig, PlanError
from fedfms.nnunet.inference import NnUNetInference
from fedfms.nnunet.plan import build_network, check_plan, describe, managers, plan_digest, travel_state
from fedfms.nnunet.sitedata import NnUNetSiteData
from fedfms.training.trainer import RoundResult, WeightsMismatch, pick_device

log = logging.getLogger(__name__)
NNUNET_DEFAULT_EPOCHS = 1000  # nnUNetTrainer.num_epochs: the poly schedule's length when nothing else says


def _nnunet_trainer_class():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer


class _InMemoryCases:
    """The dataset ``nnUNetDataLoader`` samples from: this site's cases, preprocessed by nnU-Net on load."""

    def __init__(self, data: NnUNetSiteData, indices: Sequence[int], plan: dict, mgrs):
        self.data, self.plan, self.managers = data, plan, mgrs
        self.identifiers = [str(i) for i in indices]

    def __getitem__(self, identifier):
        return self.load_case(identifier)

    def load_case(self, identifier):
        data, seg, properties = self.data.nnunet_case(int(identifier), self.plan, self.managers)
        return data, seg, None, properties


class NnUNetSiteTrainer:
    """Trains nnU-Net's planned network on one site (or pooled sites) with the federation's ``plan``.

    ``site``: a site folder, several (pooled: the centralised baseline), or an :class:`NnUNetSiteData` already
    read (the FLARE executor reads the site once, for the fingerprint, before the plan exists)."""

    is_ddp = False  # attributes nnUNetTrainer's methods read
    local_rank = 0

    def __init__(self, plan: Mapping, cfg: NnUNetConfig | Mapping, site: str | os.PathLike | Sequence | NnUNetSiteData):
        self.plan = check_plan(dict(plan))
        self.cfg = cfg if isinstance(cfg, NnUNetConfig) else NnUNetConfig.from_dict(dict(cfg))
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.device = pick_device(self.cfg.device)
        self.data = site if isinstance(site, NnUNetSiteData) else NnUNetSiteData(site, self.cfg.val_fraction, self.cfg.split_seed)
        if self.data.classes != self.plan["classes"]:
            raise PlanError(f"site {self.data.site}: classes {self.data.classes} differ from the plan's {self.plan['classes']}")
        self.digest = plan_digest(self.plan)
        self.plans_manager, self.configuration_manager, self.label_manager = managers(self.plan)
        self.enable_deep_supervision = bool(self.cfg.deep_supervision)
        self.network = build_network(self.plan, deep_supervision=self.enable_deep_supervision).to(self.device)
        self.model = self.network
        self.mode = "fedsam"  # every tensor trains and travels
        self._spec = {k: (tuple(v.shape), v.dtype) for k, v in travel_state(self.network).items()}
        self.class_names = list(self.data.classes)
        self.site = self.data.site
        self.datasets = {k: list(v) for k, v in self.data.splits.items()}

        trainer = _nnunet_trainer_class()
        self.initial_lr = float(self.cfg.lr)
        self.weight_decay = float(self.cfg.weight_decay)
        self.num_epochs = int(self.cfg.total_epochs or NNUNET_DEFAULT_EPOCHS)
        self.optimizer, self.lr_scheduler = trainer.configure_optimizers(self)
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" else None
        self.loss = trainer._build_loss(self)
        self.batch_size = int(self.configuration_manager.batch_size)
        self.oversample_foreground_percent = float(self.cfg.oversample_foreground_percent)
        self.inference = NnUNetInference(self.plan, self.network, self.device, self.cfg.mirror_tta, self.cfg.tile_step_size)
        self._loader = None
        self.epochs_done = 0
        self.current_round: int | None = None
        log.info("site %s: %s", self.site, describe(self.plan))

    # ------------------------------------------------------------------ what nnUNetTrainer's methods call
    def _do_i_compile(self) -> bool:
        return False

    def _get_deep_supervision_scales(self):
        return _nnunet_trainer_class()._get_deep_supervision_scales(self)

    def print_to_log_file(self, *args, **kwargs) -> None:
        log.debug(" ".join(str(a) for a in args))

    # ------------------------------------------------------------------ weights
    @property
    def num_train_samples(self) -> int:
        return len(self.datasets["train"])

    def travel_weights(self) -> dict[str, torch.Tensor]:
        """Every tensor of the network, once (``fedfms.nnunet.plan.travel_state``), as CPU copies."""
        return {k: v.cpu().clone() for k, v in travel_state(self.network).items()}

    def load_travel_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load global weights: exactly this plan's network (same keys and shapes)."""
        missing = sorted(set(self._spec) - set(weights))
        extra = sorted(set(weights) - set(self._spec))
        if missing or extra:
            raise WeightsMismatch(f"global weights do not match the planned nnU-Net network: {len(missing)} missing "
                                  f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})")
        for k, v in weights.items():
            if tuple(v.shape) != self._spec[k][0]:
                raise WeightsMismatch(f"global weight '{k}' has shape {tuple(v.shape)}; expected {self._spec[k][0]} "
                                      "(another plan?)")
        # the decoder's aliases of the encoder's tensors are the same tensors: they load with them
        self.network.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()}, strict=False)

    # ------------------------------------------------------------------ training
    def _train_loader(self):
        if self._loader is None:
            from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

            trainer = _nnunet_trainer_class()
            cm, lm = self.configuration_manager, self.label_manager
            rotation, dummy_2d, initial_patch_size, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
            regions = lm.foreground_regions if lm.has_regions else None
            if self.cfg.augmentation:
                transforms = trainer.get_training_transforms(
                    cm.patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes, dummy_2d,
                    use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=False, foreground_labels=lm.foreground_labels,
                    regions=regions, ignore_label=lm.ignore_label)
            else:  # no augmentation: random patches of the plan's size, nnU-Net's validation transforms
                initial_patch_size = cm.patch_size
                transforms = trainer.get_validation_transforms(self._get_deep_supervision_scales(), is_cascaded=False,
                                                               foreground_labels=lm.foreground_labels, regions=regions,
                                                               ignore_label=lm.ignore_label)
            cases = _InMemoryCases(self.data, self.datasets["train"], self.plan, (self.plans_manager, cm, lm))
            self._loader = nnUNetDataLoader(cases, self.batch_size, initial_patch_size, cm.patch_size, lm,
                                            oversample_foreground_percent=self.oversample_foreground_percent,
                                            sampling_probabilities=None, pad_sides=None, transforms=transforms,
                                            probabilistic_oversampling=False)
        return self._loader

    def _batches(self):
        loader = self._train_loader()
        if self.cfg.num_workers <= 0:
            return loader, None
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

        augmenter = NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=self.cfg.num_workers,
                                                 num_cached=max(6, self.cfg.num_workers // 2), seeds=None,
                                                 pin_memory=self.device.type == "cuda", wait_time=0.002)
        return augmenter, augmenter

    def _seed(self, epoch_index: int) -> None:
        seed = (self.cfg.seed * 1_000_003 + epoch_index) % (2 ** 31)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def fit(self, epochs: int | None = None, should_abort: Callable[[], bool] | None = None) -> dict:
        """``epochs`` nnU-Net epochs (default: the config's), each ``iterations_per_epoch`` steps of
        ``nnUNetTrainer.train_step``; the poly learning rate is set at the start of each epoch. Returns the mean
        loss, steps, seconds and the learning rates used."""
        if self.num_train_samples == 0:
            raise PlanError(f"site {self.site}: no training cases after the patient-level split")
        epochs = epochs or self.cfg.epochs
        trainer = _nnunet_trainer_class()
        self.network.train()
        self.network.decoder.deep_supervision = self.enable_deep_supervision
        first = self.current_round * self.cfg.epochs if self.current_round is not None else self.epochs_done
        total, steps, lrs, start = 0.0, 0, [], time.perf_counter()
        source, augmenter = self._batches()
        try:
            for e in range(epochs):
                epoch_index = first + e
                self._seed(epoch_index)
                self.lr_scheduler.step(min(epoch_index, self.num_epochs - 1))
                lrs.append(self.optimizer.param_groups[0]["lr"])
                for _ in range(self.cfg.iterations_per_epoch):
                    if should_abort and should_abort():
                        return {"loss": total / max(steps, 1), "steps": steps, "aborted": True, "lr": lrs}
                    loss = float(trainer.train_step(self, next(source))["loss"])
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"site {self.site}: nnU-Net's loss became {loss} at step {steps}")
                    total += loss
                    steps += 1
        finally:
            if augmenter is not None:
                augmenter._finish()
        self.epochs_done = first + epochs
        seconds = time.perf_counter() - start
        log.info("site %s: %d nnU-Net steps, mean loss %.4f, lr %s, %.1f s", self.site, steps, total / max(steps, 1),
                 [round(x, 6) for x in lrs], seconds)
        return {"loss": total / max(steps, 1), "steps": steps, "seconds": seconds, "lr": lrs}

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict:
        """Dice/IoU of whole cases of ``split`` ("val", "train" or "all"), ``LocalTrainer.evaluate``'s keys
        (both scoring rules, per class, per volume), plus nnU-Net's loss without deep supervision."""
        loss = self.loss.loss if self.enable_deep_supervision else self.loss
        return self.inference.score(self.data, self.datasets[split], loss_fn=loss)

    def train_round(self, global_weights: Mapping[str, torch.Tensor] | None = None, should_abort=None,
                    round_index: int | None = None) -> RoundResult:
        """One federated round: load the global network, score it on the validation split, train
        ``epochs`` nnU-Net epochs. ``round_index`` (FLARE's current round) places them on the poly schedule."""
        if round_index is not None:
            self.current_round = int(round_index)
        if global_weights is not None:
            self.load_travel_weights(global_weights)
        metrics = {"val_before": self.evaluate("val")} if self.datasets["val"] else {}
        metrics["train"] = self.fit(should_abort=should_abort)
        return RoundResult(self.travel_weights(), self.num_train_samples, metrics)
