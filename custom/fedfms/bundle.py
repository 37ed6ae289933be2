"""A federation's model as a MONAI bundle: ``fedfms export bundle RUN OUT``, and what the bundle runs.

The bundle (MONAI's layout)::

    configs/metadata.json    MONAI's bundle metadata (versions, task, input and output format, scores)
    configs/inference.json   python -m monai.bundle run --config_file configs/inference.json [--dataset_dir DIR ...]
    configs/logging.conf
    models/model.pt          the trained tensors only: FedMSA's travel set (adapters + mask decoder + head), or the
                             whole model for FedSAM / U-Net; never SAM's frozen encoder, never any site's data
    docs/README.md           how to run it, what it needs
    docs/model_card.md|json  the run that made it (fedfms.model_card)

``inference.json`` instantiates :class:`BundlePredictor` (``_target_``), which lists the input folder and calls
``fedfms.training.predict.predict_cases``, the one implementation behind ``fedfms predict``: the bundle writes the
same masks, pixel for pixel. A FedMSA bundle rebuilds the frozen encoder from the public SAM checkpoint it names
(config id ``sam_checkpoint``), or, for a random-init (-PT) model, from ``init_seed``; the exporter records the
frozen weights' fingerprint (``fedfms.models.frozen_fingerprint``) and the bundle refuses an encoder that differs.

FLARE-free: a clinic runs the bundle without FLARE.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from fedfms.errors import CheckpointError, ConfigError, DataError

# The project's other modules are imported in the functions that use them: the bundle's inference
# (BundlePredictor, in a clinic) loads only the prediction code, the exporter only what exporting needs.

MODEL_FILE = "models/model.pt"
BUNDLE_VERSION = "0.1.0"
METADATA_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
MODELS = ("final", "best")
PAPER = ("Liu et al., FedFMS: Exploring Federated Foundation Models for Medical Image Segmentation, MICCAI 2024; "
         "FedFMS on NVIDIA FLARE (this package)")


# ----------------------------------------------------------------------------------------------------------------
# what the bundle runs (inference.json's _target_s)


def input_files(folder: str | os.PathLike) -> list[Path]:
    """The images and NIfTI volumes directly in ``folder`` (the suffixes ``fedfms predict`` reads), sorted."""
    from fedfms.training.predict import IMAGE_SUFFIXES, NIFTI_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"dataset_dir {folder}: not a folder; expected a folder of images or NIfTI volumes "
                        "(pass --dataset_dir DIR)")
    suffixes = tuple(IMAGE_SUFFIXES) + tuple(NIFTI_SUFFIXES)
    found = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.lower().endswith(suffixes))
    if not found:
        raise DataError(f"dataset_dir {folder}: no input files; expected images ({', '.join(IMAGE_SUFFIXES)}) or NIfTI "
                        f"volumes ({', '.join(NIFTI_SUFFIXES)})")
    return found


def model_config_for(model_config: dict, sam_checkpoint: str | None) -> dict:
    """The bundle's model config with the SAM checkpoint it runs with (pretrained FedMSA only)."""
    cfg = dict(model_config)
    if cfg.get("pretrained", True):
        if not sam_checkpoint:
            raise ConfigError("sam_checkpoint is empty; this model's frozen encoder comes from the public SAM checkpoint "
                              f"of variant {cfg.get('variant')}: pass --sam_checkpoint /path/to/it")
        if "$" in str(sam_checkpoint):
            raise ConfigError(f"sam_checkpoint {sam_checkpoint!r} names an environment variable that is not set; set it "
                              "or pass --sam_checkpoint /path/to/the/checkpoint")
        cfg["checkpoint"] = str(Path(str(sam_checkpoint)).expanduser())
    return cfg


def check_frozen(model_config: dict, expected: str | None, sam_checkpoint: str | None) -> None:
    """Refuse a frozen encoder other than the one the federation trained on (another SAM checkpoint file, another
    init seed or PyTorch's init changed): averaged adapters are only meaningful on it."""
    if not expected:
        return
    from fedfms.models import ModelConfig, build_model, frozen_fingerprint

    cfg = ModelConfig.from_dict(model_config, "bundle model_config")
    found = frozen_fingerprint(build_model(cfg), cfg.mode)
    if found != expected:
        source = f"SAM checkpoint {sam_checkpoint}" if cfg.pretrained else f"init_seed {cfg.init_seed} (random init)"
        raise CheckpointError(f"the frozen encoder built from {source} has fingerprint {found[:12]}; the federation trained "
                              f"on {expected[:12]}: expected the checkpoint the run used (docs/README.md of the bundle)")


def load_network(model_config: dict, weights: str, sam_checkpoint: str | None = None,
                 frozen_fingerprint: str | None = None, device: str = "auto"):
    """The bundle's network with its weights, in eval mode (for programs that drive the model themselves)."""
    from fedfms.training.predict import load_model
    from fedfms.training.trainer import pick_device

    cfg = model_config_for(model_config, sam_checkpoint)
    check_frozen(cfg, frozen_fingerprint, sam_checkpoint)
    return load_model(cfg, weights).to(pick_device(device))


class BundlePredictor:
    """``inference.json``'s evaluator: segment every input of the dataset folder into ``output_dir`` with
    ``fedfms predict``'s own function (all or nothing, existing outputs kept unless ``overwrite``)."""

    def __init__(self, model_config: dict, weights: str, dataset_dir: str, output_dir: str,
                 sam_checkpoint: str | None = None, frozen_fingerprint: str | None = None,
                 class_names: Sequence[str] | None = None, two_and_half_d: bool = False, overwrite: bool = False,
                 allow_label_like: bool = False, device: str = "auto", resize: str = "pad"):
        # everything is checked in run(): an error there ends MONAI's traceback with its own one-line message
        self.model_config, self.weights, self.dataset_dir, self.output_dir = model_config, weights, dataset_dir, output_dir
        self.sam_checkpoint, self.frozen_fingerprint = sam_checkpoint, frozen_fingerprint
        self.class_names = list(class_names) if class_names else None
        self.two_and_half_d, self.overwrite, self.allow_label_like, self.device = (
            bool(two_and_half_d), bool(overwrite), bool(allow_label_like), device)
        self.resize = resize  # how the sites' images became squares (pad: aspect kept; stretch): predict undoes the same

    def run(self) -> list[Path]:
        from fedfms.training.predict import predict_cases

        inputs = input_files(self.dataset_dir)
        cfg = model_config_for(self.model_config, self.sam_checkpoint)
        check_frozen(cfg, self.frozen_fingerprint, self.sam_checkpoint)
        written = predict_cases(cfg, self.weights, inputs, self.output_dir, class_names=self.class_names,
                                two_and_half_d=self.two_and_half_d, overwrite=self.overwrite,
                                allow_label_like=self.allow_label_like, device=self.device, resize=self.resize)
        print(f"fedfms bundle: {len(inputs)} input(s) segmented, {len(written)} file(s) written to {self.output_dir}",
              flush=True)
        return written


# ----------------------------------------------------------------------------------------------------------------
# export


def export_bundle(run: str | Path, out: str | Path, model: str = "final", personal: str | Path | None = None,
                  job: str | Path | None = None, data_root: str | Path | None = None,
                  sam_checkpoint: str | None = None, class_names: Sequence[str] | None = None,
                  two_and_half_d: bool | None = None, overwrite: bool = False, resize: str | None = None) -> Path:
    """Write the MONAI bundle of a run's final or best global model, or of a site's personalised model file
    (``personal``), into ``out`` (made; an existing folder only with ``overwrite``). Written all or nothing.

    ``sam_checkpoint``: the SAM checkpoint the bundle names (default: the run's, as its job says); it is read here,
    when present, to record the frozen encoder's fingerprint. ``class_names`` / ``two_and_half_d`` / ``resize`` (how
    images became squares: ``pad``, SAM's way, or ``stretch``): default from the sites' manifests under ``data_root``
    when given (else ``class0``, ..., 2D and ``pad``)."""
    from fedfms.model_card import file_digest, model_card, write_card
    from fedfms.models import ModelConfig
    from fedfms.reporting.run_report import run_configs
    from fedfms.run_record import find_run_dir

    if model not in MODELS:
        raise ConfigError(f"--model is {model!r}; expected one of {', '.join(MODELS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it (nothing was written)")
    if out.exists() and not (out / "configs" / "inference.json").is_file():
        raise DataError(f"{out}: exists and is not a bundle (no configs/inference.json); not replacing it")
    run_dir = find_run_dir(run)
    raw_model, _ = run_configs(run_dir, job)
    if raw_model.get("variant") == "nnunet":
        raise ConfigError(f"{run_dir}: an nnU-Net baseline run; the bundle serves the SAM and U-Net models `fedfms predict` "
                          "runs (nnU-Net models: nnU-Net's own export)")
    cfg = ModelConfig.from_dict(raw_model, f"{run_dir}: the run's model config")
    source = Path(personal) if personal else _global_model(run_dir, model)
    weights = _trained_tensors(source, cfg, sam_checkpoint or raw_model.get("checkpoint"))

    sites = _manifest_facts(run_dir, data_root)
    names = list(class_names) if class_names else sites.get("classes") or [f"class{k}" for k in range(cfg.num_classes)]
    if len(names) != cfg.num_classes:
        raise ConfigError(f"class names {names}: the model predicts {cfg.num_classes} class(es)")
    if two_and_half_d is None:
        two_and_half_d = bool(sites.get("two_and_half_d"))
    from fedfms.data.geometry import PAD, check_resize

    resize = check_resize(resize or sites.get("resize") or PAD)

    bundle_cfg = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint"}
    needs_sam = cfg.mode == "fedmsa" and cfg.pretrained
    if not needs_sam:
        bundle_cfg["pretrained"] = False  # every weight is in models/model.pt (or the encoder comes from init_seed)
    checkpoint_default = _checkpoint_default(sam_checkpoint or raw_model.get("checkpoint"), cfg) if needs_sam else None
    fingerprint, fingerprint_note = _fingerprint(cfg, sam_checkpoint or raw_model.get("checkpoint"), needs_sam)

    staging = out.parent / f".{out.name}.fedfms-export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "models").mkdir(parents=True)
        (staging / "configs").mkdir()
        (staging / "docs").mkdir()
        import torch

        torch.save(weights, staging / MODEL_FILE)
        digest = file_digest(staging / MODEL_FILE)
        what = ("FedMSA's travel set: adapters, mask decoder, head" if cfg.mode == "fedmsa" else "every weight of the model")
        exported = {"model": "personalised" if personal else model, "source": str(source), "file": MODEL_FILE,
                    "sha256": digest, "tensors": len(weights), "what": what,
                    "frozen_encoder": _encoder_text(cfg, checkpoint_default, fingerprint)}
        card = model_card(run_dir, job=job, data_root=data_root, exported=exported)
        inference = inference_config(bundle_cfg, checkpoint_default, fingerprint, names, two_and_half_d, resize)
        metadata = metadata_json(cfg, names, two_and_half_d, card, personal is not None, model)
        (staging / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
        (staging / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (staging / "configs" / "logging.conf").write_text(LOGGING_CONF)
        write_card(card, staging / "docs")
        (staging / "docs" / "README.md").write_text(readme(cfg, card, checkpoint_default, fingerprint_note, names,
                                                           two_and_half_d))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # the old bundle (--overwrite) is set aside until the new one is in place
    previous = out.parent / f".{out.name}.fedfms-previous-{os.getpid()}"
    if out.exists():
        os.replace(out, previous)
    try:
        os.replace(staging, out)
    except OSError as exc:
        if previous.exists():
            os.replace(previous, out)
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{out}: could not move the bundle into place ({exc.strerror or exc}); nothing was changed") from None
    shutil.rmtree(previous, ignore_errors=True)
    return out


def _encoder_text(cfg, checkpoint, fingerprint: str | None) -> str | None:
    if cfg.mode != "fedmsa":
        return None
    source = f"the SAM checkpoint {checkpoint}" if cfg.pretrained else f"init_seed {cfg.init_seed} (random init, -PT)"
    return f"from {source}; fingerprint {fingerprint[:12] if fingerprint else 'not recorded'}"


def _global_model(run_dir: Path, model: str) -> Path:
    from fedfms.reporting.run_report import global_model_file

    if model == "final":
        return global_model_file(run_dir)
    found = sorted(Path(run_dir).rglob("best_FL_global_model.pt"), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise DataError(f"{run_dir}: no best_FL_global_model.pt: FLARE's model selector kept none (it compares trained "
                        "models from the second round on); export --model final")
    return found[0]


def _trained_tensors(path: Path, cfg, checkpoint: str | None) -> dict:
    """The tensors the bundle carries: exactly the model's travel set, every key and shape checked. A file that also
    holds frozen weights (a full state dict) passes only when they are the frozen encoder's own (then left out)."""
    import torch

    from fedfms.models import build_model_on_meta, travel_keys
    from fedfms.models.checkpoint import read_state_dict

    state = read_state_dict(path, "weights file", "a saved model (FL_global_model.pt or a personalised model file)")
    meta = build_model_on_meta(cfg)
    skeleton, keep = meta.state_dict(), travel_keys(meta, cfg.mode)
    missing = [k for k in keep if k not in state]
    unknown = [k for k in state if k not in skeleton]
    if missing or unknown:
        raise CheckpointError(f"{path}: does not match a {cfg.variant} {cfg.mode} model with {cfg.num_classes} class(es): "
                              f"{len(missing)} missing key(s) {missing[:1]}, {len(unknown)} unexpected key(s) {unknown[:1]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(skeleton[k].shape):
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}; expected {tuple(skeleton[k].shape)}")
    frozen = [k for k in state if k not in set(keep)]
    if frozen:
        _check_frozen_copies(path, state, frozen, cfg, checkpoint)
    return {k: state[k].detach().to("cpu").clone().contiguous() if isinstance(state[k], torch.Tensor) else state[k]
            for k in keep}


def _check_frozen_copies(path: Path, state: dict, frozen: list[str], cfg, checkpoint: str | None) -> None:
    from fedfms.evaluation.scoring import resolve_model_config
    from fedfms.models import build_model

    try:
        built = build_model(resolve_model_config(cfg, checkpoint)).state_dict()
    except (ConfigError, CheckpointError) as exc:
        raise CheckpointError(f"{path}: holds {len(frozen)} tensor(s) of the frozen encoder (e.g. {frozen[0]!r}), which "
                              f"the bundle leaves to SAM's checkpoint; to check they are SAM's own, pass --sam-checkpoint "
                              f"({exc})") from None
    changed = [k for k in frozen if not bool((state[k].float() == built[k].float()).all())]
    if changed:
        raise CheckpointError(f"{path}: {len(changed)} frozen-encoder tensor(s) (e.g. {changed[0]!r}) differ from the "
                              "frozen encoder's own; the bundle carries only the trained part and would not reproduce "
                              "this model")


def _checkpoint_default(checkpoint: str | None, cfg):
    """The bundle's default ``sam_checkpoint``: the run's path, a ``$VAR`` template as a MONAI expression that expands it
    at run time (a bare ``$`` string would be a Python expression to MONAI's config parser)."""
    from fedfms.models import get_variant

    if not checkpoint:
        return get_variant(cfg.variant).checkpoint_name
    if "$" in checkpoint:
        return f"$os.path.expandvars({checkpoint!r})"
    return str(checkpoint)


def _fingerprint(cfg, checkpoint: str | None, needs_sam: bool) -> tuple[str | None, str]:
    """The frozen encoder's fingerprint (FedMSA) and a line saying how the bundle checks it."""
    if cfg.mode != "fedmsa":
        return None, "every weight is in models/model.pt: no SAM checkpoint is needed"
    from fedfms.evaluation.scoring import resolve_model_config
    from fedfms.models import build_model, frozen_fingerprint

    try:
        full = resolve_model_config(cfg, checkpoint) if needs_sam else cfg
        if needs_sam and not Path(full.checkpoint).is_file():
            raise CheckpointError(f"{full.checkpoint}: not found")
        model = build_model(full)
    except (ConfigError, CheckpointError) as exc:
        return None, (f"the SAM checkpoint was not readable at export ({exc}); the bundle cannot check that yours is the "
                      "one the federation trained on")
    return frozen_fingerprint(model, cfg.mode), ("the bundle checks the frozen encoder it builds against the fingerprint "
                                                 "recorded at export and refuses another")


def _manifest_facts(run_dir: Path, data_root) -> dict:
    """Class names and 2.5D setting the sites' manifests agree on (empty without ``data_root``)."""
    if data_root is None:
        return {}
    from fedfms.data.site_dataset import read_manifest
    from fedfms.run_record import RUN_RECORD, read_run_record
    from fedfms.reporting.run_report import read_cross_site

    record = read_run_record(run_dir / RUN_RECORD) if (run_dir / RUN_RECORD).is_file() else None
    sites = sorted(set(read_cross_site(run_dir)) | set((record or {}).get("expected_sites") or []))
    manifests = {s: read_manifest(Path(data_root) / s) for s in sites}
    classes = {tuple(m.classes) for m in manifests.values()}
    stacks = {bool(m.settings.get("two_and_half_d")) for m in manifests.values()}
    resizes = {m.resize for m in manifests.values()}
    if len(classes) > 1 or len(stacks) > 1:
        raise DataError(f"{data_root}: the sites' manifests disagree on classes {sorted(classes)} or 2.5D {sorted(stacks)}; "
                        "pass --classes and --two-and-half-d explicitly")
    if len(resizes) > 1:
        raise DataError(f"{data_root}: the sites' manifests disagree on resize {sorted(resizes)}; pass --resize explicitly")
    return {"classes": list(next(iter(classes))) if classes else None, "two_and_half_d": next(iter(stacks), False),
            "resize": next(iter(resizes), None)}


def inference_config(bundle_cfg: dict, sam_checkpoint, fingerprint: str | None, class_names: list[str],
                     two_and_half_d: bool, resize: str = "pad") -> dict:
    """``configs/inference.json``: MONAI's config syntax, run by ``python -m monai.bundle run``."""
    for value in [*class_names, *(v for v in bundle_cfg.values() if isinstance(v, str))]:
        if value[:1] in ("$", "@", "%"):
            raise ConfigError(f"{value!r} starts with {value[0]!r}, which MONAI's config parser reads as an expression or "
                              "reference; rename it")
    return {
        "imports": ["$import os"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "auto",
        "sam_checkpoint": sam_checkpoint,
        "frozen_fingerprint": fingerprint,
        "model_config": bundle_cfg,
        "weights": f"$@bundle_root + '/{MODEL_FILE}'",
        "class_names": class_names,
        "two_and_half_d": two_and_half_d,
        "resize": resize,
        "overwrite": False,
        "allow_label_like": False,
        "dataset": {"_target_": "fedfms.bundle.input_files", "folder": "@dataset_dir"},  # the inputs, for programs
        "network_def": {"_target_": "fedfms.bundle.load_network", "model_config": "@model_config", "weights": "@weights",
                        "sam_checkpoint": "@sam_checkpoint", "frozen_fingerprint": "@frozen_fingerprint",
                        "device": "@device"},
        "evaluator": {"_target_": "fedfms.bundle.BundlePredictor", "model_config": "@model_config", "weights": "@weights",
                      "dataset_dir": "@dataset_dir", "output_dir": "@output_dir", "sam_checkpoint": "@sam_checkpoint",
                      "frozen_fingerprint": "@frozen_fingerprint", "class_names": "@class_names",
                      "two_and_half_d": "@two_and_half_d", "resize": "@resize", "overwrite": "@overwrite",
                      "allow_label_like": "@allow_label_like", "device": "@device"},
        "run": ["$@evaluator.run()"],
    }


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata_json(cfg, class_names: list[str], two_and_half_d: bool, card: dict, personal: bool, model: str) -> dict:
    """``configs/metadata.json`` with the fields of MONAI's bundle metadata schema."""
    from fedfms.models import get_variant

    size = cfg.image_size or (get_variant(cfg.variant).image_size if cfg.variant != "unet" else 1024)
    which = "a site's personalised model" if personal else f"the {model} global model"
    job, run = card["job"], card["run"]
    final = card["scores"]["average"].get("global_best" if model == "best" and not personal else "global_final", {})
    channels = ({"0": "slice k-1", "1": "slice k", "2": "slice k+1"} if two_and_half_d
                else {"0": "R (grey: the slice)", "1": "G", "2": "B"})
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by fedfms export bundle: {which} of run {run['folder']}"},
        "monai_version": _version("monai"),
        "pytorch_version": _version("torch"),
        "numpy_version": _version("numpy"),
        "required_packages_version": {k: _version(k) for k in ("fedfms", "segment-anything", "nibabel", "pillow")},
        "name": f"FedFMS {job.get('variant') or cfg.variant} {cfg.mode} segmentation",
        "task": f"2D segmentation of {', '.join(class_names)} (volumes slice by slice along the last axis)",
        "description": (f"{which} of a federated {cfg.mode} run ({cfg.variant}, {run['rounds_finished']} round(s), "
                        f"sites {', '.join(card['sites'])}); docs/model_card.md says what produced it"),
        "authors": "the federation's members (fill in before sharing)",
        "copyright": "the federation's members (fill in before sharing)",
        "data_source": f"the federation's sites {', '.join(card['sites'])}; no site data is in this bundle",
        "data_type": "png/jpg images or nifti volumes",
        "image_classes": ("3 channels in [0, 1]: 8-bit images / 255; 16-bit, float and NIfTI inputs windowed between "
                          "their own 1st and 99th percentiles" + ("; 2.5D: neighbouring slices as channels" if two_and_half_d else "")),
        "label_classes": ", ".join(f"channel {k}: {n}" for k, n in enumerate(class_names)),
        "pred_classes": ", ".join(f"{n}: 1 where sigmoid > 0.5" for n in class_names),
        "eval_metrics": {f"mean_{k}": v for k, v in final.items() if v is not None},
        "intended_use": "research; not a medical device (see docs/model_card.md for the data and limits)",
        "references": [PAPER],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "any", "num_channels": 3,
                                 "spatial_shape": [size, size], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": channels}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": cfg.num_classes,
                                 "spatial_shape": [cfg.mask_size, cfg.mask_size], "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {str(k): n for k, n in enumerate(class_names)}}},
        },
    }


def readme(cfg, card: dict, sam_checkpoint, fingerprint_note: str, class_names: list[str], two_and_half_d: bool) -> str:
    exported = card["exported"]
    lines = [f"# {card['job'].get('variant') or cfg.variant}: a federated {cfg.mode} model as a MONAI bundle", "",
             f"{exported['what']} ({exported['tensors']} tensors, sha256 `{exported['sha256']}`), the "
             f"**{exported['model']}** model of the run `{card['run']['folder']}`. What produced it (sites, rounds, "
             "settings, privacy, scores under both scoring rules, limits): [model_card.md](model_card.md).", "",
             "## Run it", "",
             "From the bundle's folder, with `fedfms` installed (it brings MONAI, segment-anything, nibabel):", "",
             "```bash",
             "python -m monai.bundle run --config_file configs/inference.json \\",
             "    --dataset_dir /path/to/inputs --output_dir /path/to/masks"
             + (f" \\\n    --sam_checkpoint /path/to/{_official_name(cfg)}" if sam_checkpoint else ""),
             "```", "",
             "From elsewhere add `--bundle_root /path/to/bundle`. `--device cpu` or `--device cuda:0` (default `auto`); "
             "`--overwrite true` replaces masks that exist.", "",
             f"Inputs: every `.png`/`.jpg` image and `.nii`/`.nii.gz` volume directly in `dataset_dir`. Outputs, exactly "
             f"as `fedfms predict` writes them (the bundle calls its function): `<name>_<class>.png` (0/255) per image, "
             f"`<name>_<class>.nii.gz` (uint8 0/1, the input's geometry) per volume; classes {', '.join(class_names)}. "
             "All or nothing: a bad input stops the run before anything is written.", ""]
    if two_and_half_d:
        lines += ["The model was trained on 2.5D inputs (slices k-1, k, k+1 as channels): keep `two_and_half_d` true.", ""]
    lines += ["## What it needs", ""]
    if cfg.mode == "fedmsa" and cfg.pretrained:
        lines += [f"FedMSA trains adapters, the mask decoder and the head on SAM's frozen encoder; the bundle carries only "
                  f"those, and the frozen encoder comes from the public SAM checkpoint (`sam_checkpoint`, default "
                  f"`{sam_checkpoint}`). {fingerprint_note[0].upper() + fingerprint_note[1:]}.", ""]
    elif cfg.mode == "fedmsa":
        lines += [f"A random-init (-PT) FedMSA model: its frozen encoder was never pretrained, and the bundle rebuilds it from "
                  f"`init_seed` {cfg.init_seed} with PyTorch's initialisation (the same PyTorch as in metadata.json "
                  f"reproduces it); no SAM checkpoint is needed. {fingerprint_note[0].upper() + fingerprint_note[1:]}.", ""]
    else:
        lines += ["Every weight of the model is in `models/model.pt`: no SAM checkpoint is needed.", ""]
    lines += ["## In a program", "",
              "`network_def` is the model with its weights (eval mode), `dataset` the input list, `evaluator` the "
              "predictor (`fedfms.bundle`):", "", "```python",
              "from monai.bundle import ConfigParser",
              "parser = ConfigParser(); parser.read_config('configs/inference.json')",
              "parser['bundle_root'] = '/path/to/bundle'",
              "model = parser.get_parsed_content('network_def')  # (N, 3, S, S) in [0, 1] -> logits (N, C, s, s)",
              "```", "",
              "No site's data is in this bundle: `models/model.pt` holds model tensors only, and the card aggregate "
              "numbers (counts and scores per site).", ""]
    return "\n".join(lines)


def _official_name(cfg) -> str:
    from fedfms.models import get_variant

    return get_variant(cfg.variant).checkpoint_name or "sam_checkpoint.pth"


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
