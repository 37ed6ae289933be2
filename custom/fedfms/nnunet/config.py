"""Settings of the FednnU-Net baseline: how the server plans (nnU-Net's ExperimentPlanner) and how each site
trains (nnU-Net's nnUNetTrainer pieces). Defaults are nnU-Net v2's own; the tiny preset is for CPU tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Mapping

from fedfms.config import from_mapping
from fedfms.errors import ConfigError, FedFMSError

NNUNET_VARIANT = "nnunet"  # ModelConfig.variant of the FednnU-Net jobs
NNUNET_VERSION = "2.8.1"  # the nnunetv2 release these pieces were taken from (requirements.txt pins it)
NORMALIZATIONS = ("zscore", "rgb_to_0_1", "rescale_to_0_1", "nonorm")  # nnU-Net's channel-name schemes (no CT: see docs)


class FingerprintError(FedFMSError, ValueError):
    """A site's fingerprint is malformed, carries a field outside the agreed summary, or contradicts the others."""


class PlanError(FedFMSError, ValueError):
    """A plan is malformed, was made by another planner, or does not fit this site."""


# Fields the server's planner reads; the rest are read by the sites' trainers.
PLAN_FIELDS = ("gpu_memory_target_gb", "base_num_features", "max_num_features", "batch_size", "normalization",
               "init_seed")


@dataclass
class NnUNetConfig:
    # --- planning, on the server (nnU-Net's ExperimentPlanner defaults) ---
    gpu_memory_target_gb: float = 8.0  # nnU-Net's VRAM target: sets the patch and batch size of the 2D plan
    base_num_features: int = 32  # features of the first stage (ExperimentPlanner.UNet_base_num_features)
    max_num_features: int = 512  # cap per stage in 2D (ExperimentPlanner.UNet_max_features_2d)
    batch_size: int | None = None  # None: the plan's (nnU-Net's VRAM estimate, capped at 5 % of the cases)
    normalization: str = "zscore"  # nnU-Net's scheme for every channel; zscore is its default for non-CT images
    init_seed: int = 0  # the server's initial global network
    # --- training, at each site (nnUNetTrainer's defaults) ---
    epochs: int = 1  # nnU-Net epochs per federated round
    iterations_per_epoch: int = 250  # nnUNetTrainer.num_iterations_per_epoch
    total_epochs: int | None = None  # length of the poly LR schedule; the job sets rounds x epochs
    lr: float = 1e-2  # nnUNetTrainer.initial_lr (SGD, Nesterov)
    momentum: float = 0.99
    weight_decay: float = 3e-5
    grad_clip: float = 12.0
    oversample_foreground_percent: float = 0.33
    deep_supervision: bool = True
    augmentation: bool = True  # nnUNetTrainer.get_training_transforms; False: the validation transforms only
    # --- inference (nnUNetPredictor's defaults) ---
    mirror_tta: bool = True
    tile_step_size: float = 0.5
    # --- as in fedfms.training.trainer.TrainConfig ---
    seed: int = 0
    val_fraction: float = 0.1  # patient-level train/val split of each site (the paper's 9:1)
    split_seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # "auto": nnU-Net's float16 autocast + GradScaler on CUDA, off on CPU; "off"
    num_workers: int = 0  # augmentation processes (nnU-Net's nnUNet_n_proc_DA); 0: in the training process
    threads: int | None = None  # torch CPU threads
    progress: bool | None = None  # accepted for compatibility with TrainConfig; nnU-Net logs per round instead

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "nnU-Net config") -> "NnUNetConfig":
        cfg = from_mapping(cls, dict(d), where)
        cfg.check(where)
        return cfg

    def check(self, where: str = "nnU-Net config") -> None:
        def positive(name, integer=True):
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) if integer else isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok or not v > 0:
                raise ConfigError(f"{where}: field {name!r} is {v!r}; expected a positive {'integer' if integer else 'number'}")

        for name in ("base_num_features", "max_num_features", "epochs", "iterations_per_epoch"):
            positive(name)
        for name in ("gpu_memory_target_gb", "lr", "grad_clip"):
            positive(name, integer=False)
        for name in ("batch_size", "total_epochs", "threads"):
            if getattr(self, name) is not None:
                positive(name)
        if self.max_num_features < self.base_num_features:
            raise ConfigError(f"{where}: max_num_features {self.max_num_features} is below base_num_features {self.base_num_features}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"{where}: field 'normalization' is {self.normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ConfigError(f"{where}: momentum {self.momentum!r} must be in [0, 1) and weight_decay {self.weight_decay!r} >= 0")
        if not 0 <= self.oversample_foreground_percent <= 1:
            raise ConfigError(f"{where}: oversample_foreground_percent is {self.oversample_foreground_percent!r}; expected 0..1")
        if not 0 < self.tile_step_size <= 1:
            raise ConfigError(f"{where}: tile_step_size is {self.tile_step_size!r}; expected 0 < step <= 1")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"{where}: val_fraction is {self.val_fraction!r}; expected a number in [0, 1)")
        if self.amp not in ("auto", "off"):
            raise ConfigError(f"{where}: field 'amp' is {self.amp!r}; expected 'auto' (nnU-Net's float16 autocast on CUDA) or 'off'")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"{where}: num_workers is {self.num_workers!r}; expected 0 or more augmentation processes")

    def to_dict(self) -> dict:
        return asdict(self)

    def plan_settings(self) -> dict:
        return {k: getattr(self, k) for k in PLAN_FIELDS}


FIELDS = tuple(f.name for f in fields(NnUNetConfig))

# The paper setting: FedFMS's 100 rounds, each one nnU-Net epoch (250 iterations) at every site; nnU-Net's own
# optimiser, loss, augmentation and 2D plan. (`{"epochs": 10}` gives nnU-Net's own 1000 epochs in 100 rounds.)
PAPER_TRAIN: dict = {"epochs": 1, "iterations_per_epoch": 250, "val_fraction": 0.1}
# CPU tests and the demo: a smaller network (8 features at the first stage), few iterations, no mirroring at
# inference, one thread per simulated site.
TINY_TRAIN: dict = {"epochs": 1, "iterations_per_epoch": 10, "base_num_features": 8, "max_num_features": 64,
                    "val_fraction": 0.2, "mirror_tta": False, "threads": 1, "device": "cpu"}
# What the jobs' model_config holds: a valid fedfms ModelConfig (the network itself comes from the plan).
MODEL_CONFIG: dict = {"variant": NNUNET_VARIANT, "mode": "fedsam", "num_classes": 1, "pretrained": False}


def check_model_config(model: Mapping, where: str = "model config") -> dict:
    """The FednnU-Net model config: variant 'nnunet', every tensor travels (mode 'fedsam'), no pretraining;
    ``num_classes`` must match the sites. Everything else about the network comes from the plan."""
    model = dict(model)
    allowed = {"variant", "mode", "num_classes", "pretrained", "init_seed", "image_size", "checkpoint"}
    unknown = sorted(set(model) - allowed)
    if unknown:
        raise ConfigError(f"{where}: field(s) {unknown} do not apply to the nnU-Net baseline (its network comes from the "
                          f"federated plan); expected some of {sorted(allowed)}")
    if model.get("variant") != NNUNET_VARIANT:
        raise ConfigError(f"{where}: variant is {model.get('variant')!r}; expected {NNUNET_VARIANT!r}")
    if model.get("mode", "fedsam") != "fedsam":
        raise ConfigError(f"{where}: mode is {model.get('mode')!r}; the nnU-Net baseline trains and sends every tensor ('fedsam')")
    if model.get("pretrained", False):
        raise ConfigError(f"{where}: the nnU-Net baseline trains from scratch; set pretrained: false")
    n = model.get("num_classes", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{where}: num_classes is {n!r}; expected a positive integer")
    return model


# The FednnU-Net job variants (``fedfms.flare.jobs.VARIANTS`` entries, docs/nnunet.md "How it is wired"): the paper's 100
# rounds of one nnU-Net epoch at every site, and a CPU variant for tests, the demo and POC checks.
JOB_VARIANTS: dict[str, dict] = {
    "fednnunet": {"model": MODEL_CONFIG, "train": PAPER_TRAIN, "num_rounds": 100},
    # as fedsam_tiny / fedmsa_tiny: 0.1 s task polling, no per-round server gc (short rounds; fedfms.flare.jobs)
    "fednnunet_tiny": {"model": MODEL_CONFIG, "train": TINY_TRAIN, "num_rounds": 2, "task_request_interval": 0.1,
                       "memory_gc_rounds": 0},
}
