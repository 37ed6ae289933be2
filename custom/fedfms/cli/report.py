"""``fedfms report``: the per-site table, run summary, figure and model card of a finished run."""

from __future__ import annotations

import json
from pathlib import Path

from fedfms.config import positive_int_arg
from fedfms.errors import FedFMSError
from fedfms.run_record import EXIT_GAPS, RUN_RECORD, best_model_note, exit_code, find_run_dir, read_run_record, summarize


def _cmd_report(args) -> int:
    from fedfms.evaluation.personal import format_record, personal_gaps, read_personal_record
    from fedfms.reporting.run_report import SCORING_NOTE, format_table, plot_report, run_pictures, site_table

    run_dir = find_run_dir(args.run)
    rows = site_table(run_dir)
    print(format_table(rows))
    print(SCORING_NOTE)
    record = read_run_record(run_dir / RUN_RECORD) if (run_dir / RUN_RECORD).is_file() else None
    if record is not None:
        print()
        print(summarize(record))
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


def add_parsers(sub) -> None:
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
