"""The ``fedfms`` command: prepare data, make and run FLARE jobs, report, predict.

Problems a user can fix are printed as one line ``error: ...`` with exit code 2, never as a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedfms.errors import FedFMSError

def _cmd_job_generate(args) -> int:
    from fedfms.flare.fed_job import generate_all

    for path in generate_all(args.jobs_dir):
        print(f"wrote {path}")
    return 0


def _site_list(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    sites = [s.strip() for s in text.split(",") if s.strip()]
    if not sites:
        raise FedFMSError(f"{option}: {text!r} names no site; expected A,B,C")
    return sites


def _site_counts(text: str | None, option: str) -> dict | None:
    """``A=120,B=340`` (or a JSON object) -> {"A": 120, "B": 340}."""
    if text is None:
        return None
    from fedfms.config import parse_json_object

    if text.lstrip().startswith("{"):
        return parse_json_object(text, option)
    counts = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        site, _, value = part.partition("=")
        if not site or not value.strip().isdigit():
            raise FedFMSError(f"{option}: {part!r} is not SITE=COUNT; expected e.g. A=120,B=340")
        counts[site.strip()] = int(value)
    return counts


def _federation_settings(args) -> dict:
    from fedfms.config import parse_json_object

    return dict(
        num_rounds=args.rounds, min_sites=args.min_sites, num_classes=args.num_classes, data_dir=args.data_dir,
        train=parse_json_object(args.train, "--train"), model=parse_json_object(args.model, "--model"),
        transfer=args.transfer, sites=_site_list(args.sites, "--sites"), on_missing_site=args.on_missing_site,
        max_samples=args.max_samples, site_samples=_site_counts(args.site_samples, "--site-samples"),
        round_timeout=args.round_timeout, no_progress_timeout=args.no_progress_timeout, aggregation=args.aggregation,
        trim_fraction=args.trim_fraction,
        norm_bound=args.norm_bound, norm_bound_action=args.norm_bound_action, flavour=args.flavour,
        tracking=args.tracking, update=args.update, privacy=args.privacy,
        privacy_args=parse_json_object(args.privacy_args, "--privacy-args"),
        processes_per_site=args.processes_per_site, encryption=args.encryption, personalise=args.personalise,
    )


def _cmd_job_new(args) -> int:
    from fedfms.flare.fed_job import write_job

    path = write_job(args.variant, args.out, overwrite=args.overwrite, **_federation_settings(args))
    print(f"wrote {path}")
    return 0


def _cmd_job_resume(args) -> int:
    from fedfms.flare.jobs import resume_settings
    from fedfms.flare.fed_job import rewrite_job

    resume = resume_settings(args.run)
    path = rewrite_job(args.job, args.out, overwrite=args.overwrite, **resume)
    print(f"wrote {path}: continues from round {resume['start_round']} with {resume['resume']['global_model']}")
    return 0


def _cmd_job_byoc(args) -> int:
    from fedfms.flare.jobs import export_byoc

    print(f"wrote {export_byoc(args.job, args.out, overwrite=args.overwrite)}")
    return 0


def _cmd_allow_list(args) -> int:
    from fedfms.flare.fed_job import class_allow_list

    print(json.dumps({"class_allow_list": class_allow_list()}, indent=2))
    return 0


def _cmd_simulate(args) -> int:
    from fedfms.flare.simulate import report_outcome, simulate

    clients = [c for c in args.clients.split(",") if c]
    gpus = None
    if args.gpu:
        try:
            gpus = sorted({int(g) for g in args.gpu.split(",") if g.strip()})
        except ValueError:
            raise FedFMSError(f"--gpu: {args.gpu!r} is not a list of GPU ids; expected e.g. 0 or 0,1") from None
    outcome = simulate(args.job, args.workspace, clients, data_root=args.data_root, threads=args.threads,
                       quiet=not args.verbose, gpus=gpus)
    return report_outcome(Path(args.workspace), outcome)


def _cmd_report(args) -> int:
    from fedfms.report import SCORING_NOTE, format_table, plot_report, run_pictures, site_table
    from fedfms.run_record import best_model_note, find_run_dir

    from fedfms.run_record import EXIT_GAPS, RUN_RECORD, exit_code, read_run_record, summarize

    run_dir = find_run_dir(args.run)
    rows = site_table(run_dir)
    print(format_table(rows))
    print(SCORING_NOTE)
    record = read_run_record(run_dir / RUN_RECORD) if (run_dir / RUN_RECORD).is_file() else None
    if record is not None:
        print()
        print(summarize(record))
    from fedfms.evaluation.personal import format_record, personal_gaps, read_personal_record

    personal = read_personal_record(run_dir)
    if personal is not None:
        print()
        print(format_record(personal))
    if args.json:
        Path(args.json).write_text(json.dumps({"sites": rows, "federation": record, "personalisation": personal}, indent=2))
    for line in best_model_note(run_dir):
        print(line)
    if args.card:
        from fedfms.model_card import model_card, write_card

        md, card_json = write_card(model_card(run_dir, job=args.job, data_root=args.data_root), args.card)
        print(f"model card: {md} and {card_json}")
    if args.png:
        pictures = None
        if args.data_root:
            pictures = run_pictures(run_dir, args.data_root, job=args.job, checkpoint=args.checkpoint, samples=args.samples)
        print(f"figure: {plot_report(run_dir, args.png, pictures=pictures)}")
        if not args.data_root:
            print("(pass --data-root with the sites' prepared folders to add pictures of the predictions)")
    elif args.data_root and not args.card:
        raise FedFMSError("--data-root draws pictures into the figure (--png) or adds the sites' manifests to the model "
                          "card (--card); pass one of them")
    code = exit_code(record)
    return EXIT_GAPS if code == 0 and personal_gaps(personal) else code


def _cmd_demo(args) -> int:
    """Prepare the offline MNI152 demo sites, then compare a threshold, each site alone, FedMSA (pretrained,
    personalised and -PT), FedSAM (all four through FLARE's simulator) and centralised training on the same
    validation slices."""
    from fedfms.demo import run_demo

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    kwargs = {"methods": methods} if methods else {}
    if args.personalise:
        kwargs["personalise"] = args.personalise
    return run_demo(args.out, rounds=args.rounds, epochs=args.epochs, verbose=args.verbose, **kwargs)


def _cmd_pretrain(args) -> int:
    from fedfms.training.pretrain import pretrain

    command = " ".join(["fedfms pretrain", "--out", str(args.out), "--steps", str(args.steps), "--batch-size",
                        str(args.batch_size), "--lr", f"{args.lr:g}", "--seed", str(args.seed)]
                       + (["--threads", str(args.threads)] if args.threads else []))
    pretrain(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
             overwrite=args.overwrite, log=lambda msg: print(msg, flush=True), log_every=args.log_every, command=command)
    return 0


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


def _cmd_check_site(args) -> int:
    from fedfms.site_check import check_site, format_report

    report = check_site(args.job, args.data_dir, args.checkpoint, args.site, measure_speed=not args.no_speed)
    print(format_report(report))
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfms", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from fedfms.cli_prepare import add_prepare_parser

    add_prepare_parser(sub)
    from fedfms.cli_evaluate import add_evaluate_parsers
    add_evaluate_parsers(sub)
    from fedfms.cli_tables import add_table_parsers
    add_table_parsers(sub)
    from fedfms.cli_export import add_export_parsers
    add_export_parsers(sub)

    job = sub.add_parser("job", help="FLARE job folders").add_subparsers(dest="job_command", required=True)
    p = job.add_parser("generate", help="rewrite every job variant under jobs/ from fedfms.flare.jobs")
    p.add_argument("--jobs-dir", default="jobs")
    p.set_defaults(func=_cmd_job_generate)
    p = job.add_parser("new", help="write one job variant with your settings")
    p.add_argument("variant", help="fedsam, fedmsa, fedsam_l, fedmsa_l, fedunet, fednnunet, fedsam_tiny, fedmsa_tiny, fednnunet_tiny")
    p.add_argument("out")
    p.add_argument("--rounds", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--data-dir", help="default data location at each site ({site_name} and $VARS expanded)")
    p.add_argument("--train", help='JSON of train settings, e.g. \'{"lr": 1e-4, "batch_size": 4}\'')
    p.add_argument("--model", help='JSON of model settings, e.g. \'{"activation_checkpointing": true}\'')
    p.add_argument("--transfer", choices=["float32", "float16"], help="precision of the models on the wire (float16: half the bytes)")
    p.add_argument("--tracking", choices=["tensorboard", "mlflow"],
                   help="experiment tracking at the server: TensorBoard (default) or MLflow too (SQLite store in the run folder)")
    p.add_argument("--flavour", choices=["project", "reference"],
                   help="reference: head, input scaling, pos_weight, adapter init and FedMSA block order as in the paper's "
                        "code (docs/evaluation.md)")
    p.add_argument("--processes-per-site", type=int, help="DDP processes per site, one per GPU (default 1; a site's "
                                                          "local/fedfms_site.json may set its own: docs/multi-gpu.md)")
    fed = p.add_argument_group("federation (docs/federation.md)")
    fed.add_argument("--sites", help="the sites that must take part, A,B,C (default: whoever is connected at start)")
    fed.add_argument("--min-sites", "--min-clients", dest="min_sites", type=int,
                     help="fewest accepted contributions a round may average (default: a majority of the sites)")
    fed.add_argument("--on-missing-site", choices=["continue", "stop"],
                     help="continue while --min-sites remain (default), or stop when any site misses a round")
    fed.add_argument("--site-samples", help="pinned FedAvg weights, A=120,B=340 (each site's train samples from "
                                           "`fedfms check-site`); any other count from that site is rejected")
    fed.add_argument("--max-samples", type=int, help="largest sample count a site may report (default 1000000)")
    fed.add_argument("--round-timeout", type=float, help="outer bound in seconds on a round's wait (default: none; a round "
                                                         "waits while its sites report progress)")
    fed.add_argument("--no-progress-timeout", type=float, help="seconds without a report from a site (dead, frozen, "
                                                               "unreachable) before a round stops waiting for it (default 120)")
    fed.add_argument("--aggregation", choices=["fedavg", "mean", "median", "trimmed_mean"],
                     help="fedavg: FLARE's own (default); median / trimmed_mean: robust, coordinate-wise")
    fed.add_argument("--trim-fraction", type=float, help="trimmed_mean: share cut at each end per coordinate (0.2)")
    fed.add_argument("--norm-bound", type=float, help="clip updates farther than K x the round's median distance")
    fed.add_argument("--norm-bound-action", choices=["clip", "reject"])
    fed.add_argument("--personalise", help="personalised federation: what each site keeps and does after the last round, "
                                           "comma-separated: norm (FedBN), head, decoder, finetune:N, alone (a site-alone "
                                           "comparison); e.g. norm,finetune:5 (docs/federation.md#personalised-federation)")
    priv = p.add_argument_group("privacy (docs/federation.md#privacy-options)")
    priv.add_argument("--update", choices=["weights", "weight_diff"], help="what a site sends: its weights (default) or "
                                                                          "their change to the global model")
    priv.add_argument("--privacy", choices=["percentile", "svt"], help="FLARE's differential-privacy filter on every "
                                                                       "training update (implies --update weight_diff)")
    priv.add_argument("--privacy-args", help='JSON arguments of the filter, e.g. \'{"percentile": 10, "gamma": 0.01}\'')
    priv.add_argument("--encryption", choices=["he"], help="FedMSA only: the travel set as CKKS ciphertext with FLARE's "
                                                          "TenSEAL filters; needs HE contexts in every kit (docs/privacy-he.md)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_job_new)
    p = job.add_parser("resume", help="continue a stopped run as a new job from its last saved global model")
    p.add_argument("job", help="the job folder that was running (made by `fedfms job new`)")
    p.add_argument("run", help="the server's run folder of the stopped job (holds fedfms_run.json and FL_global_model.pt)")
    p.add_argument("out", help="where to write the continuing job")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_job_resume)
    p = job.add_parser("export-byoc", help="copy a job and add this package as app/custom (bring your own code)")
    p.add_argument("job")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_job_byoc)
    p = job.add_parser("allow-list", help="print the site local/resources.json class_allow_list for these jobs")
    p.set_defaults(func=_cmd_allow_list)

    p = sub.add_parser("simulate", help="run a job in FLARE's simulator")
    p.add_argument("job")
    p.add_argument("--workspace", required=True)
    p.add_argument("--clients", default="site-1,site-2", help="comma-separated site names")
    p.add_argument("--data-root", help="folder holding one prepared site folder per client name")
    p.add_argument("--threads", type=int, help="sites that train at the same time (default: as many as fit in free "
                                                 "GPU or host memory; the others wait their turn each round)")
    p.add_argument("--gpu", help="GPU ids to spread the simulated sites over, e.g. 0 or 0,1 (default: every visible GPU)")
    p.add_argument("--verbose", action="store_true", help="console: FLARE's full INFO log (default: one line per round, "
                                                          "warnings and errors; the full logs are always in the workspace)")
    p.add_argument("--quiet", action="store_true", help="the default (kept for scripts written for older versions)")
    p.set_defaults(func=_cmd_simulate)

    from fedfms.config import positive_int_arg

    p = sub.add_parser("demo", help="offline demo: MNI152 white matter at 4 simulated sites (one scarce, one with inverted "
                                    "contrast); a threshold, each site alone, FedMSA (pretrained, personalised, -PT), FedSAM "
                                    "and centralised side by side")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--rounds", type=positive_int_arg, default=10, help="federated rounds (default 10)")
    p.add_argument("--epochs", type=positive_int_arg, default=3, help="local epochs per round (default 3); "
                                                                      "alone and centralised train rounds x epochs epochs")
    p.add_argument("--methods", help="comma-separated subset of threshold,alone,fedmsa,fedmsa_personal,fedmsa_pt,fedsam,"
                                     "central (default: all)")
    p.add_argument("--personalise", help="the personalised FedMSA row's setting (default finetune:5, from the FedMSA run "
                                         "itself; one with a local part, e.g. norm,finetune:5, runs its own federation; "
                                         "docs/federation.md#personalised-federation)")
    p.add_argument("--verbose", action="store_true", help="show FLARE's full console log (INFO) instead of one line per round")
    p.set_defaults(func=_cmd_demo)

    from fedfms.training.pretrain import DEFAULTS as PRETRAIN

    p = sub.add_parser("pretrain", help="pretrain the tiny SAM offline on generated scenes (no dataset, no download) and "
                                        "save it in the official SAM checkpoint layout")
    p.add_argument("--out", required=True, help="checkpoint file to write (a .json with its provenance goes beside it)")
    p.add_argument("--steps", type=positive_int_arg, default=PRETRAIN["steps"], help=f"default {PRETRAIN['steps']}")
    p.add_argument("--batch-size", type=positive_int_arg, default=PRETRAIN["batch_size"],
                   help=f"generated scenes per step (default {PRETRAIN['batch_size']})")
    p.add_argument("--lr", type=float, default=PRETRAIN["lr"], help=f"peak learning rate (default {PRETRAIN['lr']:g})")
    p.add_argument("--seed", type=int, default=PRETRAIN["seed"], help="seeds the scenes and the initial weights (default 0)")
    p.add_argument("--threads", type=positive_int_arg, help="torch CPU threads (the same thread count reproduces the file)")
    p.add_argument("--log-every", type=positive_int_arg, default=100, help="steps between two progress lines")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("report", help="per-site Dice/IoU table (and figure) of a finished run; exit 0 only when "
                                      "every round averaged every site (3: some site missed rounds, 1: the run stopped)")
    p.add_argument("run", help="simulator workspace, downloaded job result or server job folder")
    p.add_argument("--png", help="write the figure here")
    p.add_argument("--json", help="write the table here")
    p.add_argument("--data-root", help="folder with the sites' prepared data (one folder per site): the figure gets "
                                       "image / ground truth / prediction pictures of a few validation samples per site; "
                                       "the model card (--card) gets their manifests' sample counts and presets")
    p.add_argument("--job", help="the job folder the run used (default: the sites' config found in the run's workspace)")
    p.add_argument("--checkpoint", help="SAM checkpoint for a pretrained model's frozen parts (replaces $FEDFMS_SAM_CHECKPOINT)")
    p.add_argument("--samples", type=positive_int_arg, default=2, help="validation samples pictured per site (default 2)")
    p.add_argument("--card", metavar="DIR", help="write the run's model card, DIR/model_card.md and .json (job, sites, "
                                                 "contributions, scores under both rules, privacy, limits)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("check-site", help="pre-flight: can this site run this job? (data, checkpoint, device, its own "
                                          "seconds per sample, fingerprint)")
    p.add_argument("--job", required=True, help="the job folder the federation will run, e.g. jobs/fedmsa")
    p.add_argument("--data-dir", required=True, help="this site's prepared data folder")
    p.add_argument("--checkpoint", help="this site's SAM checkpoint (default: the job's, $VARS expanded)")
    p.add_argument("--site", default="site", help="this site's FLARE client name (for {site_name} in paths)")
    p.add_argument("--no-speed", action="store_true", help="skip the one training step that measures this site's "
                                                            "seconds per sample and peak memory on its device")
    p.set_defaults(func=_cmd_check_site)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedFMSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
