"""``fedfms predict``: segment new images or volumes with a trained model (``fedfms.training.predict``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedfms.errors import FedFMSError


def _cmd_predict(args) -> int:
    from fedfms.models import ModelConfig
    from fedfms.training.predict import predict_cases

    if args.job:
        from fedfms.flare.jobs import job_model_config

        raw = job_model_config(args.job)
    elif args.model_config:
        path = Path(args.model_config)
        try:
            raw = json.loads(path.read_text())
        except OSError as exc:
            raise FedFMSError(f"{path}: cannot read the model config ({exc.strerror or exc}); expected a JSON file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FedFMSError(f"{path}: not valid JSON ({exc}); expected a model_config object") from None
        if not isinstance(raw, dict):
            raise FedFMSError(f"{path}: holds {type(raw).__name__}; expected a JSON object (a job's model_config)")
    else:
        raise FedFMSError("predict needs --job (the job folder that trained the model) or --model-config")
    cfg = ModelConfig.from_dict(raw, "model config")
    if args.checkpoint:
        cfg.checkpoint = args.checkpoint
    from fedfms.evaluation.personal import describe_site_model, site_model_info

    info = site_model_info(args.weights)
    if info:
        print(f"weights: {describe_site_model(info)}", file=sys.stderr)
    written = predict_cases(cfg, args.weights, args.inputs, args.out, class_names=args.classes,
                            two_and_half_d=args.two_and_half_d, overwrite=args.overwrite,
                            allow_label_like=args.allow_label_like, overlay=args.overlay,
                            probabilities=args.probabilities, resize=args.resize)
    for path in written:
        print(path)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("predict", help="segment new images (PNG/JPG/TIFF) or volumes (NIfTI) with a trained global model")
    p.add_argument("inputs", nargs="+", help="image or NIfTI files, or folders of them")
    p.add_argument("--weights", required=True, help="global model file (e.g. FL_global_model.pt from a run), or a site's model "
                                                   "of a personalised job (fedfms_personal/global_model.pt or personal_model.pt "
                                                   "in the site's run folder)")
    p.add_argument("--job", help="the job folder that trained the model (its model_config is used)")
    p.add_argument("--model-config", help="or: a JSON file with the model_config")
    p.add_argument("--checkpoint", help="SAM checkpoint for the frozen parts (pretrained models)")
    p.add_argument("--classes", nargs="+", help="class names for the output files (default class0, class1, ...)")
    p.add_argument("--out", required=True, help="folder for the predictions (made if missing; written all or nothing)")
    p.add_argument("--two-and-half-d", action="store_true",
                   help="volumes: slices k-1, k, k+1 as the channels (for models trained on sites prepared with --two-and-half-d)")
    p.add_argument("--overwrite", action="store_true", help="replace predictions that already exist in --out")
    p.add_argument("--overlay", action="store_true",
                   help="also write <name>_<class>_overlay.png: the input with the prediction drawn on it (red), the picture "
                        "`fedfms report --data-root` draws (a volume: a few slices side by side)")
    p.add_argument("--allow-label-like", action="store_true",
                   help="predict on inputs that look like masks (a handful of whole-number values), which are refused by default")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <name>_<class>_prob.tif (images) or .nii.gz (volumes): the soft map, float32 in [0, 1]")
    p.add_argument("--resize", choices=["pad", "stretch"], default="pad",
                   help="how inputs become the model's square, as for its training sites (their manifest's resize): pad keeps "
                        "the aspect ratio (default), stretch for sites prepared with --preset reference or before padding existed")
    p.set_defaults(func=_cmd_predict)
