"""The ``fedfms`` command: prepare data, make and run FLARE jobs, report, predict.

Problems a user can fix are printed as one line ``error: ...`` with exit code 2, never as a traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedfms.errors import FedFMSError

DEMO_SITES = ("site-1", "site-2", "site-3")


def _cmd_job_generate(args) -> int:
    from fedfms.flare.jobs import generate_all

    for path in generate_all(args.jobs_dir):
        print(f"wrote {path}")
    return 0


def _cmd_job_new(args) -> int:
    from fedfms.flare.jobs import write_job

    from fedfms.config import parse_json_object

    train, model = parse_json_object(args.train, "--train"), parse_json_object(args.model, "--model")
    path = write_job(args.variant, args.out, overwrite=args.overwrite, num_rounds=args.rounds, min_clients=args.min_clients,
                     num_classes=args.num_classes, data_dir=args.data_dir, train=train, model=model, transfer=args.transfer)
    print(f"wrote {path}")
    return 0


def _cmd_job_byoc(args) -> int:
    from fedfms.flare.jobs import export_byoc

    print(f"wrote {export_byoc(args.job, args.out, overwrite=args.overwrite)}")
    return 0


def _cmd_allow_list(args) -> int:
    from fedfms.flare.jobs import class_allow_list

    print(json.dumps({"class_allow_list": class_allow_list()}, indent=2))
    return 0


def _cmd_simulate(args) -> int:
    from fedfms.flare.simulate import run_simulation, server_job_dir

    clients = [c for c in args.clients.split(",") if c]
    rc = run_simulation(args.job, args.workspace, clients, data_root=args.data_root, threads=args.threads, quiet=args.quiet)
    if rc != 0:
        print(f"error: simulation failed (exit {rc}); see {Path(args.workspace) / 'server' / 'log.txt'}", file=sys.stderr)
        return 1
    print(f"finished; results in {server_job_dir(args.workspace)}")
    return 0


def _cmd_report(args) -> int:
    from fedfms.report import find_run_dir, format_table, plot_report, site_table

    run_dir = find_run_dir(args.run)
    rows = site_table(run_dir)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.png:
        print(f"figure: {plot_report(run_dir, args.png)}")
    return 0


def _cmd_demo(args) -> int:
    """Prepare the offline MNI152 demo, federate FedMSA (tiny SAM) over three simulated sites, report."""
    from fedfms.data.preparers.registry import prepare
    from fedfms.flare.jobs import write_job
    from fedfms.flare.simulate import run_simulation, server_job_dir
    from fedfms.report import format_table, plot_report, site_table

    out = Path(args.out)
    start = time.perf_counter()
    sites = prepare("mni-demo", out / "raw", out / "sites", image_size=128, mask_size=32)
    run = out / "runs" / time.strftime("%Y%m%d-%H%M%S")  # every run keeps its own folder
    job = write_job(args.variant, run / "job", num_rounds=args.rounds, min_clients=len(sites))
    print(f"running {args.variant} for {args.rounds} rounds on {len(sites)} simulated sites (log: {run / 'workspace'})", flush=True)
    rc = run_simulation(job, run / "workspace", list(DEMO_SITES), data_root=out / "sites", quiet=not args.verbose)
    if rc != 0:
        print(f"error: simulation failed (exit {rc}); see {run / 'workspace' / 'server' / 'log.txt'}", file=sys.stderr)
        return 1
    rows = site_table(server_job_dir(run / "workspace"))
    (run / "report.json").write_text(json.dumps(rows, indent=2))
    png = plot_report(server_job_dir(run / "workspace"), run / "report.png", title=f"{args.variant} on the MNI152 demo")
    print()
    print(format_table(rows))
    print(f"\nwall time {time.perf_counter() - start:.0f} s; figure {png}; table {run / 'report.json'}")
    return 0


def _cmd_predict(args) -> int:
    from fedfms.models import ModelConfig
    from fedfms.training.predict import predict_cases

    if args.job:
        from fedfms.flare.jobs import job_model_config

        raw = job_model_config(args.job)
    elif args.model_config:
        raw = json.loads(Path(args.model_config).read_text())
    else:
        raise FedFMSError("predict needs --job (the job folder that trained the model) or --model-config")
    cfg = ModelConfig.from_dict(raw, "model config")
    if args.checkpoint:
        cfg.checkpoint = args.checkpoint
    written = predict_cases(cfg, args.weights, args.inputs, args.out, class_names=args.classes)
    for path in written:
        print(path)
    return 0


def _cmd_check_site(args) -> int:
    from fedfms.site_check import check_site, format_report

    print(format_report(check_site(args.job, args.data_dir, args.checkpoint, args.site)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfms", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from fedfms.cli_prepare import add_prepare_parser

    add_prepare_parser(sub)
    from fedfms.cli_evaluate import add_evaluate_parsers
    add_evaluate_parsers(sub)

    job = sub.add_parser("job", help="FLARE job folders").add_subparsers(dest="job_command", required=True)
    p = job.add_parser("generate", help="rewrite every job variant under jobs/ from fedfms.flare.jobs")
    p.add_argument("--jobs-dir", default="jobs")
    p.set_defaults(func=_cmd_job_generate)
    p = job.add_parser("new", help="write one job variant with your settings")
    p.add_argument("variant", help="fedsam, fedmsa, fedsam_l, fedmsa_l, fedsam_tiny, fedmsa_tiny")
    p.add_argument("out")
    p.add_argument("--rounds", type=int)
    p.add_argument("--min-clients", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--data-dir", help="default data location at each site ({site_name} and $VARS expanded)")
    p.add_argument("--train", help='JSON of train settings, e.g. \'{"lr": 1e-4, "batch_size": 4}\'')
    p.add_argument("--model", help='JSON of model settings, e.g. \'{"activation_checkpointing": true}\'')
    p.add_argument("--transfer", choices=["float32", "float16"], help="precision of the models on the wire (float16: half the bytes)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_job_new)
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
    p.add_argument("--threads", type=int)
    p.add_argument("--quiet", action="store_true", help="console: warnings and per-round progress only (full logs in the workspace)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("demo", help="offline demo: MNI152 white matter, 3 simulated sites, FedMSA on CPU")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--variant", default="fedmsa_tiny", choices=["fedmsa_tiny", "fedsam_tiny"])
    p.add_argument("--verbose", action="store_true", help="show FLARE's full console log")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("report", help="per-site Dice/IoU table (and figure) of a finished run")
    p.add_argument("run", help="simulator workspace, downloaded job result or server job folder")
    p.add_argument("--png", help="write the figure here")
    p.add_argument("--json", help="write the table here")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("check-site", help="pre-flight: can this site run this job? (data, checkpoint, device, fingerprint)")
    p.add_argument("--job", required=True, help="the job folder the federation will run, e.g. jobs/fedmsa")
    p.add_argument("--data-dir", required=True, help="this site's prepared data folder")
    p.add_argument("--checkpoint", help="this site's SAM checkpoint (default: the job's, $VARS expanded)")
    p.add_argument("--site", default="site", help="this site's FLARE client name (for {site_name} in paths)")
    p.set_defaults(func=_cmd_check_site)

    p = sub.add_parser("predict", help="segment new images (PNG/JPG) or volumes (NIfTI) with a trained global model")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--weights", required=True, help="global model file (e.g. FL_global_model.pt from a run)")
    p.add_argument("--job", help="the job folder that trained the model (its model_config is used)")
    p.add_argument("--model-config", help="or: a JSON file with the model_config")
    p.add_argument("--checkpoint", help="SAM checkpoint for the frozen parts (pretrained models)")
    p.add_argument("--classes", nargs="+", help="class names for the output files (default class0, class1, ...)")
    p.add_argument("--out", required=True)
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
