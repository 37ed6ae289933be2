"""A site's local trainer. It knows nothing of FLARE: weights in, weights + sample count + metrics out."""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
from fedfms import monai_import  # noqa: F401  (before MONAI: fedfms/monai_import.py)
from monai.losses import DiceLoss
from torch.utils.data import ConcatDataset, DataLoader, RandomSampler, SequentialSampler, Subset
from tqdm.auto import tqdm

from fedfms.data.site_dataset import SiteDataset, patient_split
from fedfms.config import from_mapping
from fedfms.errors import ConfigError
from fedfms.models import ModelConfig, build_model, local_spec, local_state_dict, trained_keys, travel_spec, travel_state_dict
from fedfms.training.metrics import SegmentationMetric, reference_space

log = logging.getLogger(__name__)


def compile_regions(model: torch.nn.Module) -> int:
    """Regional compilation: ``torch.compile`` each transformer block of SAM's image encoder in place (FedMSA's
    adapted blocks with their adapters). The blocks share one code path, so the graph is compiled once per block
    shape (windowed / global attention) and reused, instead of compiling the whole model; the rest of the model
    runs eagerly. Parameter names and the state dict are unchanged. Returns the number of blocks compiled."""
    encoder = getattr(model, "image_encoder", None)
    if encoder is None:
        raise ConfigError("train config: compile 'regional' compiles the blocks of SAM's image encoder; this model "
                          f"({type(model).__name__}) has none (set compile: false)")
    for block in encoder.blocks:
        block.compile()
    return len(encoder.blocks)


@dataclass
class TrainConfig:
    epochs: int = 1  # local epochs per round
    batch_size: int = 6
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    loss: str = "bce"  # "bce" (the paper) or "bce_dice"
    pos_weight: float = 1.0  # BCE weight of positive pixels; the paper's code used 2 (flavour "reference")
    seed: int = 0
    val_fraction: float = 0.1  # patient-level train/val split of each site (paper 9:1)
    split_seed: int = 0
    device: str = "auto"  # "auto": cuda if available
    amp: str = "auto"  # "auto": bf16 autocast on CUDA, off on CPU; "bf16"; "off"
    num_workers: int | str = "auto"  # "auto": on CUDA min(8, CPUs - 1) loader processes, on CPU none (they compete with training)
    cache_decoded: bool | str = "auto"  # "auto": keep decoded images in RAM when they fit (a quarter of free memory, 16 GiB at most)
    max_steps_per_epoch: int | None = None  # smoke runs
    threads: int | None = None  # torch CPU threads (several sites sharing a CPU)
    progress: bool | None = None  # None: a progress bar only on a terminal
    compile: bool | str = False  # "regional": torch.compile each block of SAM's image encoder (compile_regions)

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "train config") -> "TrainConfig":
        cfg = from_mapping(cls, {**d, **({"betas": tuple(d["betas"])} if "betas" in d else {})}, where)
        if cfg.loss not in ("bce", "bce_dice"):
            raise ConfigError(f"{where}: field 'loss' is {cfg.loss!r}; expected 'bce' or 'bce_dice'")
        if not isinstance(cfg.pos_weight, (int, float)) or isinstance(cfg.pos_weight, bool) or not cfg.pos_weight > 0:
            raise ConfigError(f"{where}: field 'pos_weight' is {cfg.pos_weight!r}; expected a positive number (1: plain BCE; "
                              "the paper's code used 2)")
        if not (cfg.compile is False or cfg.compile == "regional"):
            raise ConfigError(f"{where}: field 'compile' is {cfg.compile!r}; expected false or 'regional' (torch.compile each "
                              "block of the image encoder)")
        if cfg.batch_size < 1 or cfg.epochs < 1 or not cfg.lr > 0:
            raise ConfigError(f"{where}: batch_size, epochs and lr must be positive (got {cfg.batch_size}, {cfg.epochs}, {cfg.lr})")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RoundResult:
    weights: dict[str, torch.Tensor]  # the travel set after local training
    num_samples: int  # training samples at this site: the FedAvg weight
    metrics: dict


class WeightsMismatch(ValueError):
    """Incoming weights do not match this model's travel set."""


def resolve_num_workers(setting: int | str, device: torch.device) -> int:
    """DataLoader processes: a number, or "auto" (on CUDA one per spare CPU core up to 8, so decoding keeps up
    with the GPU; on CPU none, since loader processes would take cores from training)."""
    if setting == "auto":
        return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ConfigError(f"train config: field 'num_workers' is {setting!r}; expected a non-negative integer or 'auto'")
    return setting


CACHE_BUDGET_FRACTION = 0.25
CACHE_BUDGET_MAX = 16 * 2**30


def should_cache(setting: bool | str, needed_bytes: int, available_bytes: int | None = None) -> bool:
    """Keep decoded images in RAM: True/False, or "auto" when they take at most a quarter of the free memory
    (and 16 GiB)."""
    if setting == "auto":
        if available_bytes is None:
            try:
                import psutil

                available_bytes = psutil.virtual_memory().available
            except ImportError:  # pragma: no cover
                available_bytes = 0
        return needed_bytes <= min(CACHE_BUDGET_FRACTION * available_bytes, CACHE_BUDGET_MAX)
    if not isinstance(setting, bool):
        raise ConfigError(f"train config: field 'cache_decoded' is {setting!r}; expected true, false or 'auto'")
    return setting


def autocast_for(device: torch.device, amp: str = "auto"):
    """bf16 autocast on CUDA ("auto" or "bf16"); full precision on CPU ("auto") or when ``amp`` is "off". The one
    precision rule of training, scoring and prediction."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LocalTrainer:
    """Fits and evaluates one site's model on its prepared data (see ``fedfms.data.site_dataset``)."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, site_dir: str | Sequence[str], model=None):
        """``site_dir``: one site's folder, or several to pool them (the paper's centralised baseline); each
        site is split into train/val by patient on its own, then the parts are concatenated."""
        self.model_cfg, self.cfg = model_cfg, train_cfg
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        self.device = pick_device(train_cfg.device)
        self.model = (model or build_model(model_cfg)).to(self.device)
        if train_cfg.compile == "regional":
            compile_regions(self.model)
        self.mode = model_cfg.mode
        self.local_parts = model_cfg.local_parts  # what a personalised job keeps at this site, never sent
        self._spec = travel_spec(self.model, self.mode, self.local_parts)
        self._local_spec = local_spec(self.model, self.mode, self.local_parts)
        site_dirs = [site_dir] if isinstance(site_dir, (str, os.PathLike)) else list(site_dir)
        parts = {"train": [], "val": [], "all": []}
        for d in site_dirs:
            full = SiteDataset(d, image_size=self.model.image_size, mask_size=self.model.mask_size)
            if full.num_classes != model_cfg.num_classes:
                raise ConfigError(
                    f"{d}: the site has {full.num_classes} class(es) {full.manifest.classes}; "
                    f"the model config says num_classes={model_cfg.num_classes}"
                )
            if parts["all"] and full.manifest.classes != parts["all"][0].manifest.classes:
                raise ConfigError(f"{d}: classes {full.manifest.classes} differ from {parts['all'][0].manifest.classes}; cannot pool")
            train_idx, val_idx = patient_split(full.volumes, train_cfg.val_fraction, train_cfg.split_seed)
            parts["train"].append(Subset(full, train_idx))
            parts["val"].append(Subset(full, val_idx))
            parts["all"].append(full)
        self.class_names = parts["all"][0].manifest.classes
        self.site = "+".join(f.manifest.site for f in parts["all"])
        self.datasets = {k: v[0] if len(v) == 1 else ConcatDataset(v) for k, v in parts.items()}
        self.num_workers = resolve_num_workers(train_cfg.num_workers, self.device)
        self.cached = should_cache(train_cfg.cache_decoded, sum(f.decoded_bytes() for f in parts["all"]))
        if self.cached:
            for full in parts["all"]:
                full.preload()
        self._loaders: dict[str, tuple[DataLoader, torch.Generator]] = {}
        params = [p for p in self.model.parameters() if p.requires_grad]
        # On a GPU, PyTorch's fused Adam (one kernel per step for every tensor); on a CPU its default, as before
        self.optimizer = torch.optim.Adam(params, lr=train_cfg.lr, betas=train_cfg.betas, weight_decay=train_cfg.weight_decay,
                                          fused=True if self.device.type == "cuda" else None)
        self.bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(train_cfg.pos_weight, device=self.device))
        self.dice_loss = DiceLoss(sigmoid=True) if train_cfg.loss == "bce_dice" else None
        self.rounds_done = 0
        # Set only by multi-process training (fedfms.training.distributed); a single process leaves both alone.
        # train_module: what the training forward runs through (there: a DistributedDataParallel wrapper of
        # self.model). shard(sampler, batch_size): a batch sampler that gives this process its part of each
        # batch the single-process order would make, with share(step) (its part of that batch's mean loss) and
        # grad_scale(step) (the factor on its loss that makes the processes' averaged gradient that batch's).
        self.train_module: torch.nn.Module = self.model
        self.shard: Callable | None = None

    # ------------------------------------------------------------------ weights
    @property
    def num_train_samples(self) -> int:
        return len(self.datasets["train"])

    def travel_weights(self) -> dict[str, torch.Tensor]:
        """What leaves the site: the trained tensors less the local part."""
        return travel_state_dict(self.model, self.mode, self.local_parts)

    def local_weights(self) -> dict[str, torch.Tensor]:
        """The site's local part (``local_parts``; empty when the job keeps nothing here)."""
        return local_state_dict(self.model, self.mode, self.local_parts)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """Every trained tensor, shared and local: the site's whole model (what a personal model file holds)."""
        keys = set(trained_keys(self.model, self.mode))
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if k in keys}

    def load_travel_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load global weights; they must be exactly this mode's travel set (same keys and shapes). The local part
        stays as it is."""
        self._load_checked(weights, self._spec, f"the {self.mode} travel set", "global")

    def load_local_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load this site's local part (exactly its keys and shapes)."""
        self._load_checked(weights, self._local_spec, f"the local part ({', '.join(self.local_parts) or 'none'})", "local")

    def load_trained_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load a whole site model: the travel set and the local part."""
        self._load_checked(weights, {**self._spec, **self._local_spec}, f"the {self.mode} trained tensors", "site")

    def _load_checked(self, weights: Mapping[str, torch.Tensor], spec: Mapping, what: str, kind: str) -> None:
        missing = sorted(set(spec) - set(weights))
        extra = sorted(set(weights) - set(spec))
        if missing or extra:
            raise WeightsMismatch(
                f"{kind} weights do not match {what}: {len(missing)} missing (e.g. {missing[:1]}), "
                f"{len(extra)} unexpected (e.g. {extra[:1]})"
            )
        for k, v in weights.items():
            if tuple(v.shape) != spec[k][0]:
                raise WeightsMismatch(f"{kind} weight '{k}' has shape {tuple(v.shape)}; expected {spec[k][0]}")
        tensors = {k: torch.as_tensor(v) for k, v in weights.items()}
        self.model.load_state_dict(tensors, strict=False)

    def reset_optimizer(self) -> None:
        """Forget Adam's moments (a fine-tune or a fresh start does not inherit the federation's last round)."""
        self.optimizer.state.clear()

    # ------------------------------------------------------------------ loops
    def _autocast(self):
        return autocast_for(self.device, self.cfg.amp)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """One DataLoader per split for the trainer's life (its worker processes persist across epochs and
        rounds); the shuffle order is re-seeded from (seed, round) before each pass, so it does not depend on
        the number of workers."""
        key = f"{split}:{shuffle}"
        if key not in self._loaders:
            generator = torch.Generator()
            # the sampler owns the generator: a DataLoader given one also draws its workers' base seed from it,
            # but only when it makes a new iterator, which a persistent loader does once
            sampler = RandomSampler(self.datasets[split], generator=generator) if shuffle else None
            batching = {"batch_size": self.cfg.batch_size, "sampler": sampler}
            if self.shard is not None and split == "train":
                batching = {"batch_sampler": self.shard(sampler or SequentialSampler(self.datasets[split]), self.cfg.batch_size)}
            loader = DataLoader(
                self.datasets[split],
                **batching,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0,
                prefetch_factor=4 if self.num_workers > 0 else None,
            )
            self._loaders[key] = (loader, generator)
        loader, generator = self._loaders[key]
        generator.manual_seed(self.cfg.seed * 100_003 + self.rounds_done)
        return loader

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = self.bce(logits, target)
        if self.dice_loss is not None:
            loss = loss + self.dice_loss(logits, target)
        return loss

    def step(self, images: torch.Tensor, masks: torch.Tensor, grad_scale: float = 1.0) -> float:
        """One optimisation step on a batch; returns the loss. (The benchmarks time exactly this.) ``grad_scale``
        multiplies the loss before the backward pass (multi-process training: see ``shard``)."""
        images = images.to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.train_module(images)
        loss = self._loss(logits, masks)
        self.optimizer.zero_grad(set_to_none=True)
        (loss if grad_scale == 1.0 else loss * grad_scale).backward()
        self.optimizer.step()
        return loss.item()

    def fit(self, epochs: int | None = None, should_abort: Callable[[], bool] | None = None,
            on_progress: Callable[[str, int, int], None] | None = None) -> dict:
        """Train ``epochs`` local epochs (default: the config's). Returns mean loss, steps and time.
        ``on_progress("train", samples done, samples of all epochs)`` after every step."""
        if self.num_train_samples == 0:
            raise ConfigError(f"site {self.site}: no training samples after the patient-level split")
        self.model.train()
        total, steps, start = 0.0, 0, time.perf_counter()
        epochs = epochs or self.cfg.epochs
        per_epoch = self.num_train_samples
        if self.cfg.max_steps_per_epoch:
            per_epoch = min(per_epoch, self.cfg.max_steps_per_epoch * self.cfg.batch_size)
        done, planned = 0, epochs * per_epoch
        for epoch in range(epochs):
            torch.manual_seed(self.cfg.seed + 7919 * self.rounds_done + epoch)
            loader = self._loader("train", shuffle=True)
            bar = tqdm(loader, desc=f"{self.site} epoch {epoch + 1}", leave=False, disable=_progress_disabled(self.cfg.progress))
            for i, batch in enumerate(bar):
                if should_abort and should_abort():
                    return {"loss": total / max(steps, 1), "steps": steps, "aborted": True}
                if self.cfg.max_steps_per_epoch and i >= self.cfg.max_steps_per_epoch:
                    break
                if self.shard is None:
                    loss = self.step(batch["image"], batch["mask"])
                else:  # this process's part of the batch; its mean loss counts by its share in the batch's
                    loss = self.step(batch["image"], batch["mask"], loader.batch_sampler.grad_scale(i))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"site {self.site}: training loss became {loss} at step {steps}")
                total += loss if self.shard is None else loss * loader.batch_sampler.share(i)
                steps += 1
                if on_progress is not None:
                    done = min(done + len(batch["image"]), planned)
                    on_progress("train", done, planned)
                bar.set_postfix(loss=f"{loss:.4f}")
        self.rounds_done += 1
        seconds = time.perf_counter() - start
        log.info("site %s: %d steps, mean loss %.4f, %.1f s", self.site, steps, total / max(steps, 1), seconds)
        return {"loss": total / max(steps, 1), "steps": steps, "seconds": seconds}

    @torch.no_grad()
    def evaluate(self, split: str = "val", on_progress: Callable[[str, int, int], None] | None = None) -> dict:
        """Dice/IoU on ``split`` ("val", "train" or "all") plus the mean loss; NaN metrics if the split is empty.

        Keys (see ``fedfms.training.metrics``): this project's rule ``dice``, ``iou``, ``dice_per_class``,
        ``iou_per_class``, ``volume_dice``, ``volume_iou``, ``volume_dice_per_class``, ``volume_iou_per_class``;
        the paper code's rule ``dice_reference``, ``iou_reference``, ``dice_reference_per_class``,
        ``iou_reference_per_class`` (with ``reference_thresholds`` and ``reference_on``); and ``classes``,
        ``num_slices``, ``num_volumes``, ``num_samples``, ``loss``. ``on_progress("validate", samples done, samples
        of the split)`` after every batch."""
        metric = SegmentationMetric(self.class_names, reference_on=reference_space(self.model_cfg.variant))
        self.model.eval()
        total, n = 0.0, 0
        for batch in self._loader(split, shuffle=False):
            images = batch["image"].to(self.device)
            masks = batch["mask"].to(self.device)
            with self._autocast():
                logits = self.model(images)
            total += self._loss(logits, masks).item() * len(images)
            n += len(images)
            metric.update(logits.float(), masks, batch["volume"], batch.get("valid"))
            if on_progress is not None:
                on_progress("validate", n, len(self.datasets[split]))
        result = metric.aggregate()
        result["loss"] = total / n if n else math.nan
        result["num_samples"] = n
        return result

    def train_round(self, global_weights: Mapping[str, torch.Tensor] | None = None, should_abort=None,
                    on_progress: Callable[[str, int, int], None] | None = None) -> RoundResult:
        """One federated round: load the global travel set, fit, report. The metrics include the
        validation score of the *received* global model (what model selection should compare).
        ``on_progress(phase, done, total)``: see :meth:`evaluate` and :meth:`fit`."""
        if global_weights is not None:
            self.load_travel_weights(global_weights)
        metrics = {"val_before": self.evaluate("val", on_progress)} if len(self.datasets["val"]) else {}
        metrics["train"] = self.fit(should_abort=should_abort, on_progress=on_progress)
        return RoundResult(self.travel_weights(), self.num_train_samples, metrics)


def _progress_disabled(progress: bool | None):
    return None if progress is None else not progress
