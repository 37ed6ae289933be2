"""One nnU-Net plan for the whole federation, made on the server from the merged site fingerprints.

:class:`FederatedExperimentPlanner` is nnU-Net v2's own ``ExperimentPlanner`` (topology, patch size, batch
size, normalisation, architecture: all its methods) fed with the merged fingerprint instead of reading
``nnUNet_raw``/``nnUNet_preprocessed``; :func:`make_plan` runs the 2D part of ``plan_experiment`` (nnU-Net
plans no 3D configuration for 2D images anyway: their median shape has one slice).

A *plan* here is one JSON object: nnU-Net's ``plans`` (with its ``2d`` configuration), the ``dataset_json``
nnU-Net's label manager and preprocessor read, and how this project's site folders map onto them (classes,
label mode, input channels). Every site must train with the identical object: :func:`plan_digest` is its
SHA-256, which the sites report with every update and the server compares.
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import nullcontext
from typing import Mapping

import numpy as np
import torch

from fedfms.nnunet.config import NNUNET_VERSION, NnUNetConfig, PlanError

PLAN_FORMAT = "fedfms-nnunet-plan"
PLAN_VERSION = 1
CONFIGURATION = "2d"
LABEL_MODES = ("softmax", "regions")
# nnU-Net's reader for 2D images (PNG): every pixel is 1 x 1 and slices are 999 apart, so nothing is resampled
NATURAL_IMAGE_SPACING = (999.0, 1.0, 1.0)


def _planner_class():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    class FederatedExperimentPlanner(ExperimentPlanner):
        """nnU-Net's ExperimentPlanner on a fingerprint held in memory (the merge of the sites' fingerprints).

        ``ExperimentPlanner.__init__`` reads the dataset's files; this one sets the same attributes to the same
        values (nnunetv2 2.8.1; ``tests/nnunet/test_plan.py`` checks them against the real class) from the merged
        fingerprint and a ``dataset.json`` built from the sites' classes. The planning methods are nnU-Net's."""

        def __init__(self, fingerprint: dict, dataset_json: dict, gpu_memory_target_in_gb: float = 8,
                     base_num_features: int = 32, max_num_features_2d: int = 512):
            self.dataset_name = "Dataset000_FedFMS"
            self.suppress_transpose = False
            self.raw_dataset_folder = None  # nothing is read from disk
            self.dataset_json = dataset_json
            self.dataset = None
            self.dataset_fingerprint = fingerprint
            self.anisotropy_threshold = ANISO_THRESHOLD
            self.UNet_base_num_features = base_num_features
            self.UNet_class = PlainConvUNet
            self.UNet_reference_val_3d = 560000000
            self.UNet_reference_val_2d = 85000000
            self.UNet_reference_com_nfeatures = 32
            self.UNet_reference_val_corresp_GB = 8
            self.UNet_reference_val_corresp_bs_2d = 12
            self.UNet_reference_val_corresp_bs_3d = 2
            self.UNet_featuremap_min_edge_length = 4
            self.UNet_blocks_per_stage_encoder = (2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2)
            self.UNet_blocks_per_stage_decoder = (2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2)
            self.UNet_min_batch_size = 2
            self.UNet_max_features_2d = max_num_features_2d
            self.UNet_max_features_3d = 320
            self.max_dataset_covered = 0.05
            self.UNet_vram_target_GB = gpu_memory_target_in_gb
            self.lowres_creation_threshold = 0.25
            self.preprocessor_name = "DefaultPreprocessor"
            self.plans_identifier = "nnUNetPlans"
            self.overwrite_target_spacing = None
            self.plans = None

        def determine_reader_writer(self):
            return NaturalImage2DIO

        def save_plans(self, plans):  # the plan travels to the sites instead of into nnUNet_preprocessed
            self.plans = plans

        def plan_2d(self) -> dict:
            """``ExperimentPlanner.plan_experiment`` for a 2D dataset: the same steps, in the same order, without
            the 3D branch it skips for 2D data and without copying files."""
            from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

            transpose_forward, transpose_backward = self.determine_transpose()
            fullres_spacing = self.determine_fullres_target_spacing()
            fullres_spacing_transposed = fullres_spacing[transpose_forward]
            new_shapes = [compute_new_shape(j, i, fullres_spacing) for i, j in
                          zip(self.dataset_fingerprint["spacings"], self.dataset_fingerprint["shapes_after_crop"])]
            new_median_shape = np.median(new_shapes, 0)
            new_median_shape_transposed = new_median_shape[transpose_forward]
            if new_median_shape_transposed[0] != 1:
                raise PlanError(f"the merged fingerprint describes 3D cases (median shape {new_median_shape_transposed}); "
                                "the site folders hold 2D slices")
            approximate_n_voxels_dataset = float(np.prod(new_median_shape_transposed, dtype=np.float64) *
                                                 self.dataset_json["numTraining"])
            plan_2d = self.get_plans_for_configuration(fullres_spacing_transposed[1:], new_median_shape_transposed[1:],
                                                       self.generate_data_identifier("2d"), approximate_n_voxels_dataset, {})
            plan_2d["batch_dice"] = True
            median_spacing = np.median(self.dataset_fingerprint["spacings"], 0)[transpose_forward]
            median_shape = np.median(self.dataset_fingerprint["shapes_after_crop"], 0)[transpose_forward]
            plans = {
                "dataset_name": self.dataset_name,
                "plans_name": self.plans_identifier,
                "original_median_spacing_after_transp": [float(i) for i in median_spacing],
                "original_median_shape_after_transp": [int(round(i)) for i in median_shape],
                "image_reader_writer": self.determine_reader_writer().__name__,
                "transpose_forward": [int(i) for i in transpose_forward],
                "transpose_backward": [int(i) for i in transpose_backward],
                "configurations": {"2d": plan_2d},
                "experiment_planner_used": ExperimentPlanner.__name__,
                "label_manager": "LabelManager",
                "foreground_intensity_properties_per_channel": self.dataset_fingerprint[
                    "foreground_intensity_properties_per_channel"],
            }
            self.save_plans(plans)
            return plans

    return FederatedExperimentPlanner


def label_dict(classes: list[str], label_mode: str) -> tuple[dict, list[int] | None]:
    """nnU-Net's ``labels`` (and ``regions_class_order``) for the site classes.

    ``softmax`` (classes never overlap: nnU-Net's default, one output per label incl. background): class k is
    label k + 1. ``regions`` (some pixel is in two classes, e.g. the optic cup inside the disc): the label of a
    pixel is its bit-packed class set (as stored in the site's mask PNG) and class k is the region of every
    label with bit k set -- nnU-Net's region-based training (sigmoid outputs, Dice + BCE)."""
    if label_mode == "softmax":
        return {"background": 0, **{name: k + 1 for k, name in enumerate(classes)}}, None
    values = range(1, 1 << len(classes))
    labels = {"background": 0, **{name: [v for v in values if v & (1 << k)] for k, name in enumerate(classes)}}
    return labels, [1 << k for k in range(len(classes))]


def dataset_json(classes: list[str], label_mode: str, num_channels: int, num_training: int, normalization: str) -> dict:
    labels, order = label_dict(classes, label_mode)
    # the channel name selects nnU-Net's normalisation scheme (zscore is also its default for unknown names)
    out = {"channel_names": {str(c): normalization for c in range(num_channels)}, "labels": labels,
           "numTraining": int(num_training), "file_ending": ".png"}
    if order is not None:
        out["regions_class_order"] = order
    return out


def _json_plain(obj):
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    obj = copy.deepcopy(obj)
    recursive_fix_for_json_export(obj)
    return json.loads(json.dumps(obj))


def make_plan(merged: Mapping, settings: NnUNetConfig | Mapping | None = None) -> dict:
    """The federation's plan from the merged fingerprint (:func:`fedfms.nnunet.fingerprint.merge_fingerprints`)
    and the job's planning settings (``gpu_memory_target_gb``, ``base_num_features``, ``max_num_features``,
    ``batch_size``, ``normalization``, ``init_seed``)."""
    cfg = settings if isinstance(settings, NnUNetConfig) else NnUNetConfig.from_dict(dict(settings or {}))
    classes = list(merged["classes"])
    label_mode = "regions" if merged["overlapping_classes"] else "softmax"
    channels = 1 if merged["grey"] else 3
    ds = dataset_json(classes, label_mode, channels, merged["num_cases"], cfg.normalization)
    planner = _planner_class()(merged["nnunet_fingerprint"], ds, cfg.gpu_memory_target_gb, cfg.base_num_features,
                               cfg.max_num_features)
    threads = torch.get_num_threads()
    try:
        plans = planner.plan_2d()
    finally:
        torch.set_num_threads(threads)  # nnU-Net's VRAM estimate changes the thread count
    if cfg.batch_size is not None:
        plans["configurations"]["2d"]["batch_size"] = int(cfg.batch_size)
    plan = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "nnunet_version": NNUNET_VERSION,
        "configuration": CONFIGURATION,
        "classes": classes,
        "label_mode": label_mode,
        "num_input_channels": channels,
        "init_seed": int(cfg.init_seed),
        "planning_settings": cfg.plan_settings(),
        "federation": {k: merged[k] for k in ("num_sites", "num_cases")},
        "plans": plans,
        "dataset_json": ds,
    }
    return check_plan(_json_plain(plan))


REQUIRED = ("format", "version", "configuration", "classes", "label_mode", "num_input_channels", "init_seed", "plans",
            "dataset_json")


def check_plan(plan) -> dict:
    """The plan if it is one this project made and can train with; PlanError naming what is wrong otherwise."""
    if not isinstance(plan, Mapping):
        raise PlanError(f"the nnU-Net plan is a {type(plan).__name__}; expected a JSON object")
    missing = [k for k in REQUIRED if k not in plan]
    if missing:
        raise PlanError(f"the nnU-Net plan has no field(s) {missing}")
    if plan["format"] != PLAN_FORMAT or plan["version"] != PLAN_VERSION:
        raise PlanError(f"the nnU-Net plan's format is {plan['format']!r} v{plan['version']!r}; expected {PLAN_FORMAT!r} v{PLAN_VERSION}")
    if plan["label_mode"] not in LABEL_MODES:
        raise PlanError(f"the nnU-Net plan's label_mode is {plan['label_mode']!r}; expected one of {LABEL_MODES}")
    if plan["num_input_channels"] not in (1, 3):
        raise PlanError(f"the nnU-Net plan has {plan['num_input_channels']!r} input channels; expected 1 (grey) or 3 (RGB)")
    try:
        config = plan["plans"]["configurations"][plan["configuration"]]
        config["architecture"]["network_class_name"], config["patch_size"], config["batch_size"]
    except (KeyError, TypeError) as exc:
        raise PlanError(f"the nnU-Net plan has no usable '{plan.get('configuration')}' configuration ({exc!r} missing)") from None
    return dict(plan)


def plan_digest(plan: Mapping) -> str:
    """SHA-256 of the plan's canonical JSON: equal at two sites exactly when they train with the same plan."""
    text = json.dumps(plan, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def num_outputs(plan: Mapping) -> int:
    """Segmentation heads: background + one per class (softmax), or one per class (regions)."""
    return len(plan["classes"]) + (1 if plan["label_mode"] == "softmax" else 0)


def managers(plan: Mapping):
    """nnU-Net's (PlansManager, ConfigurationManager, LabelManager) for the plan."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(plan["plans"]))
    cm = pm.get_configuration(plan["configuration"])
    lm = pm.get_label_manager(plan["dataset_json"])
    if lm.num_segmentation_heads != num_outputs(plan):
        raise PlanError(f"the nnU-Net plan's labels give {lm.num_segmentation_heads} outputs; expected {num_outputs(plan)}")
    return pm, cm, lm


def build_network(plan: Mapping, deep_supervision: bool = True, device: str | torch.device | None = None) -> torch.nn.Module:
    """nnU-Net's planned 2D network (``get_network_from_plans``, He initialisation), seeded with the plan's
    ``init_seed`` so every builder gets the same weights."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    check_plan(plan)
    arch = plan["plans"]["configurations"][plan["configuration"]]["architecture"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(plan["init_seed"]))
        with torch.device(device) if device is not None else nullcontext():
            return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                          plan["num_input_channels"], num_outputs(plan), allow_init=True,
                                          deep_supervision=deep_supervision)


def travel_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict without aliases: every tensor once, under its first name. (nnU-Net's U-Net decoder
    keeps a reference to the encoder, so ``state_dict()`` lists every encoder tensor twice, as ``encoder.*`` and
    ``decoder.encoder.*``; sending both would nearly triple the bytes of a round for nothing.) Loading these keys
    sets the aliases too: they are the same tensors."""
    seen, out = set(), {}
    for key, value in network.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            out[key] = value.detach()
    return out


def travel_spec(plan: Mapping) -> dict:
    """key -> (shape, dtype) of what travels (:func:`travel_state`: every tensor of the planned network, once),
    built on the meta device."""
    network = build_network(plan, device="meta")
    return {k: (tuple(v.shape), v.dtype) for k, v in travel_state(network).items()}


def describe(plan: Mapping) -> str:
    """One line: patch, batch, stages, features, label mode."""
    c = plan["plans"]["configurations"][plan["configuration"]]
    a = c["architecture"]["arch_kwargs"]
    return (f"2D plan: patch {list(c['patch_size'])}, batch {c['batch_size']}, {a['n_stages']} stages, features "
            f"{list(a['features_per_stage'])}, {plan['num_input_channels']} input channel(s), {plan['label_mode']} over "
            f"{plan['classes']}, normalisation {c['normalization_schemes']}, mask for norm {c['use_mask_for_norm']}")
