"""``fedfms job``: write FLARE job folders (new, generate, resume, export-byoc, allow-list) from the one job builder
(``fedfms.flare.fed_job``)."""

from __future__ import annotations

import json

from fedfms.config import parse_json_object
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
    from fedfms.flare.fed_job import rewrite_job
    from fedfms.flare.jobs import resume_settings

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


def add_parsers(sub) -> None:
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
