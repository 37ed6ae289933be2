"""``fedfms evaluate``, ``fedfms loso`` and ``fedfms centralized``: the paper's evaluation protocol.

The main CLI calls :func:`add_parsers`; each command returns an exit code, and problems a user can
fix raise :class:`fedfms.errors.FedFMSError` for the main CLI to print as one line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedfms.config import parse_json_object, positive_int_arg
from fedfms.errors import ConfigError

LOSO_EPILOG = """\
examples:
  fedfms loso fedmsa --data-root /data/prostate --workspace runs/loso_fedmsa --centralized \\
      --checkpoint /models/sam_vit_b_01ec64.pth
  fedfms loso fedmsa_tiny --data-root demo_out/sites --workspace runs/loso_demo --rounds 5 --holdout site-3 --centralized

Each fold lives in WORKSPACE/<held-out site>/ and is never replaced without --overwrite; run folds in
separate calls with --holdout and the results files gather every finished fold (docs/evaluation.md).
"""



def _model_config(args) -> dict:
    if args.job:
        from fedfms.flare.loso_runner import training_settings

        return training_settings(args.job)["model"]
    if args.model_config:
        path = Path(args.model_config)
        if not path.is_file():
            raise ConfigError(f"{path}: model config file not found")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    raise ConfigError("evaluate needs --job (the job folder or variant that trained the model) or --model-config")


def _cmd_evaluate(args) -> int:
    from fedfms.evaluation.personal import describe_site_model, site_model_info
    from fedfms.evaluation.scoring import evaluate_sites, format_site_rows, mean_row

    info = site_model_info(args.weights)
    if info:
        print(f"weights: {describe_site_model(info)}")
    rows = evaluate_sites(_model_config(args), args.weights, args.sites, batch_size=args.batch_size,
                          device=args.device, checkpoint=args.checkpoint)
    print(format_site_rows(rows, args.scoring))
    if args.json:
        from fedfms.evaluation.results import json_safe
        from fedfms.evaluation.scoring import scoring_notes

        # both rules are always written; "scoring" records what the console table showed
        out = {"weights": str(args.weights), "scoring": args.scoring,
               "rules": scoring_notes("both", rows[0].get("reference_on") if rows else "logits"),
               "sites": [{k: json_safe(v) for k, v in r.items()} for r in rows],
               "average": {k: json_safe(v) for k, v in mean_row(rows).items()}}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_loso(args) -> int:
    from fedfms.flare.loso_runner import leave_one_site_out

    sites = [s for s in (args.sites or "").split(",") if s] or None
    leave_one_site_out(
        args.job, args.data_root, sites, args.workspace, rounds=args.rounds, holdouts=args.holdout,
        centralized=args.centralized, train_overrides=parse_json_object(args.train, "--train"),
        model_overrides=parse_json_object(args.model, "--model"), overwrite=args.overwrite, checkpoint=args.checkpoint,
        batch_size=args.batch_size, device=args.device, log=lambda msg: print(msg, flush=True),
        flavour=args.flavour, scoring=args.scoring, verbose=args.verbose,
    )
    return 0


def _cmd_centralized(args) -> int:
    from fedfms.evaluation.centralized import train_centralized
    from fedfms.evaluation.loso import train_config
    from fedfms.evaluation.results import json_safe
    from fedfms.evaluation.scoring import evaluate_sites, format_site_rows
    from fedfms.flare.loso_runner import training_settings
    from fedfms.training.weights_files import history_path, last_weights_path

    settings = training_settings(args.job, parse_json_object(args.train, "--train"), parse_json_object(args.model, "--model"),
                                 flavour=args.flavour)
    train = dict(settings["train"])
    if not args.epochs and settings["num_rounds"] is None:
        raise ConfigError(f"{args.job}: a job written by hand has no recipe to give its rounds; pass --epochs")
    epochs = args.epochs or settings["num_rounds"] * train_config(settings).epochs
    out = Path(args.out)
    weights = train_centralized(settings["model"], train, args.sites, epochs, out / "model.pt", overwrite=args.overwrite,
                                checkpoint=args.checkpoint, log=lambda msg: print(msg, flush=True))
    history = json.loads(history_path(weights).read_text())
    print(f"trained {epochs} epoch(s) on {history['train_samples']} pooled samples; kept epoch {history['selected_epoch']} "
          f"({history['selection']}): {weights}")
    if args.test:
        report = {}
        for name, path in (("selected epoch", weights), ("last epoch", last_weights_path(weights))):
            rows = evaluate_sites(settings["model"], path, args.test, batch_size=args.batch_size, device=args.device,
                                  checkpoint=args.checkpoint)
            print(f"\n{name} ({path.name}) on the test site(s):")
            print(format_site_rows(rows, args.scoring))
            report[name] = [{k: json_safe(v) for k, v in r.items()} for r in rows]
        (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out / 'evaluation.json'}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="SAM checkpoint for pretrained models (replaces $FEDFMS_SAM_CHECKPOINT)")
    p.add_argument("--batch-size", type=positive_int_arg, default=6, help="evaluation batch size (default 6)")
    p.add_argument("--device", default="auto", help="evaluation device: auto (cuda if available), cpu, cuda:0, ...")
    p.add_argument("--scoring", choices=["honest", "reference", "both"], default="honest",
                   help="which rule the table (and loso's CSV) shows: honest = this project's (sigmoid > 0.5, empty/empty "
                        "slices left out, also 3D); reference = the paper code's (per slice, thresholds 0.1,0.3,0.5,0.7,0.9 on raw "
                        "logits averaged, empty/empty = 1; columns 'ref Dice'/'ref IoU'); both. JSON files keep both")


def _flavour(p: argparse.ArgumentParser) -> None:
    from fedfms.flavours import FLAVOURS

    p.add_argument("--flavour", choices=sorted(FLAVOURS),
                   help="model flavour for a job variant: project (default settings) or reference (the paper code's "
                        "head, input scaling, no dense prompt, adapter init, FedMSA block order, pos_weight 2); docs/evaluation.md")


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice/IoU of a saved model on whole sites (every sample is test data)")
    p.add_argument("sites", nargs="+", metavar="SITE_DIR", help="prepared site folders to score")
    p.add_argument("--weights", required=True, help="saved travel set: FL_global_model.pt, best_FL_global_model.pt, "
                                                   "a centralized model.pt, or a site's model of a personalised job "
                                                   "(fedfms_personal/global_model.pt or personal_model.pt)")
    p.add_argument("--job", help="job folder or variant name that trained the model (its model_config is used)")
    p.add_argument("--model-config", help="or: a JSON file with the model_config")
    p.add_argument("--json", help="also write the scores here")
    _common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("loso", help="leave-one-site-out: federate all sites but one, score the held-out one",
                       epilog=LOSO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", metavar="JOB_VARIANT", help="job variant (fedsam, fedmsa, fedunet, fednnunet, fedmsa_tiny, ...) or job folder")
    p.add_argument("--data-root", required=True, help="folder with one prepared site folder per site")
    p.add_argument("--sites", help="comma-separated site names (default: every site folder under --data-root)")
    p.add_argument("--workspace", required=True, help="one sub-folder per fold, plus loso_results.json/.csv")
    p.add_argument("--rounds", type=positive_int_arg, help="federated rounds (default: the job's)")
    p.add_argument("--holdout", action="append", metavar="SITE", help="run only this fold (repeatable; default: all)")
    p.add_argument("--centralized", action="store_true",
                   help="also train the same model on the pooled training sites (rounds x local epochs epochs)")
    p.add_argument("--train", help='JSON of train settings for a variant, e.g. \'{"lr": 5e-5}\'')
    p.add_argument("--model", help='JSON of model settings for a variant, e.g. \'{"num_classes": 2}\'')
    p.add_argument("--overwrite", action="store_true", help="replace existing fold folders of the held-out sites")
    p.add_argument("--verbose", action="store_true", help="console: FLARE's full INFO log of each fold (default: one line "
                                                          "per round; the full logs are in each fold's simulator.log)")
    _flavour(p)
    _common(p)
    p.set_defaults(func=_cmd_loso)

    p = sub.add_parser("centralized", help="the centralised baseline: train on pooled sites, score on test sites")
    p.add_argument("sites", nargs="+", metavar="SITE_DIR", help="training site folders (each split 9:1 by patient, pooled)")
    p.add_argument("--test", nargs="+", metavar="SITE_DIR", help="held-out site folders to score")
    p.add_argument("--job", required=True, help="job variant or folder whose model and train settings to use")
    p.add_argument("--epochs", type=positive_int_arg, help="default: the job's rounds x local epochs")
    p.add_argument("--train", help="JSON of train settings to change")
    p.add_argument("--model", help="JSON of model settings to change")
    p.add_argument("--out", required=True, help="folder for model.pt (selected epoch), model_last.pt, model.json")
    p.add_argument("--overwrite", action="store_true")
    _flavour(p)
    _common(p)
    p.set_defaults(func=_cmd_centralized)
