"""``fedfms table1`` and ``fedfms table2``: the paper's Table 1 from LOSO results, Table 2 measured here.

The main CLI calls :func:`add_parsers`; problems a user can fix raise
:class:`fedfms.errors.FedFMSError`, printed as one line."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedfms.errors import ConfigError
from fedfms.config import positive_int_arg

TABLE1_EPILOG = """\
examples:
  fedfms table1 runs/loso/prostate/fedsam runs/loso/prostate/fedmsa runs/loso/prostate/fedunet --out table1.md
  fedfms table1 runs/loso/*/* --scoring reference --select best --out table1_reference.md

Each RUN_DIR is a `fedfms loso` workspace (its loso_results.json). Runs on the same sites make one table per
dataset; FedSAM/FedMSA/FedU-Net rows come from the federated folds, the rows without 'Fed' from the
centralised baseline (`fedfms loso --centralized`). --out writes Markdown and a CSV beside it (docs/evaluation.md).
"""

TABLE2_EPILOG = """\
examples:
  fedfms table2                                  # tiny, vit_b, vit_l, unet; FLOPs on the meta device (seconds)
  fedfms table2 --variants vit_b --attention stock --out table2.md

Step time, peak memory and predict time are measured only where CUDA is present; on a CPU the table says
they need a GPU instead of printing a CPU figure.
"""


def _out_paths(out: str | None, csv: str | None) -> tuple[Path | None, Path | None]:
    if out is None:
        return None, Path(csv) if csv else None
    md = Path(out)
    if md.suffix.lower() not in (".md", ".markdown"):
        raise ConfigError(f"--out {out}: expected a Markdown file name ending in .md (the CSV goes beside it)")
    if not md.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {md.parent} does not exist")
    return md, Path(csv) if csv else md.with_suffix(".csv")


def _cmd_table1(args) -> int:
    from fedfms.reporting.tables import build_table1, format_table1, write_table1_csv

    md, csv_path = _out_paths(args.out, args.csv)
    tables = build_table1(args.runs, select=args.select)
    text = format_table1(tables, args.scoring, args.select)
    print(text, end="")
    if md:
        md.write_text(text)
        print(f"wrote {md}")
    if csv_path:
        write_table1_csv(tables, csv_path, args.scoring, args.select)
        print(f"wrote {csv_path}")
    return 0


def _cmd_table2(args) -> int:
    from fedfms.reporting.tables import build_table2, format_table2, write_table2_csv

    md, csv_path = _out_paths(args.out, args.csv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    from fedfms.training.personal import Personalisation

    personal = Personalisation.parse(args.personalise, "--personalise")
    rows = build_table2(variants, num_classes=args.num_classes, attention=args.attention, flavour=args.flavour,
                        gpu=True if args.gpu else None, batch_size=args.batch_size, steps=args.steps,
                        log=lambda msg: print(msg, flush=True), local_parts=personal.local_parts if personal else ())
    text = format_table2(rows)
    print()
    print(text, end="")
    if md:
        md.write_text(text)
        print(f"wrote {md}")
    if csv_path:
        write_table2_csv(rows, csv_path)
        print(f"wrote {csv_path}")
    return 0



def add_parsers(sub) -> None:
    p = sub.add_parser("table1", help="the paper's Table 1 (LOSO Dice/IoU per held-out site) from 'fedfms loso' runs",
                       epilog=TABLE1_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="'fedfms loso' workspaces (or their loso_results.json)")
    p.add_argument("--out", help="write the Markdown here (e.g. table1.md); a CSV goes beside it")
    p.add_argument("--csv", help="write the CSV here instead")
    p.add_argument("--scoring", choices=["honest", "reference", "both"], default="both",
                   help="honest: this project's rule; reference: the paper code's (per slice, thresholds "
                        "0.1,0.3,0.5,0.7,0.9 on raw logits averaged, empty/empty = 1); both (default): one table each")
    p.add_argument("--select", choices=["final", "best"], default="final",
                   help="final (default): the last global model and the centralised last epoch; best: the models "
                        "picked on the training sites' validation Dice")
    p.set_defaults(func=_cmd_table1)

    p = sub.add_parser("table2", help="the paper's Table 2: parameters, bytes per round, FLOPs (and GPU times) per site",
                       epilog=TABLE2_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="tiny,vit_b,vit_l,unet", help="comma-separated: tiny, vit_b, vit_l, unet")
    p.add_argument("--num-classes", type=positive_int_arg, default=1, help="classes of the head (default 1)")
    p.add_argument("--attention", choices=["fused", "stock"], default="fused",
                   help="SAM attention to count: fused (default, what the jobs run) or stock (segment-anything's, "
                        "what the paper's code ran)")
    p.add_argument("--flavour", choices=["project", "reference"], default="project", help="model flavour (default project)")
    p.add_argument("--personalise", help="a personalised job's setting, e.g. norm or head: the bytes it still sends "
                                         "(docs/federation.md#personalised-federation)")
    p.add_argument("--gpu", action="store_true", help="require the GPU timings (default: measured when CUDA is present)")
    p.add_argument("--batch-size", type=positive_int_arg, default=6, help="training batch of the step timing (default 6)")
    p.add_argument("--steps", type=positive_int_arg, default=5, help="timed steps and predictions after warm-up (default 5)")
    p.add_argument("--out", help="write the Markdown here (e.g. table2.md); a CSV goes beside it")
    p.add_argument("--csv", help="write the CSV here instead")
    p.set_defaults(func=_cmd_table2)
