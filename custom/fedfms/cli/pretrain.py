"""``fedfms pretrain``: pretrain the tiny SAM offline (``fedfms.training.pretrain``)."""

from __future__ import annotations

from fedfms.config import positive_int_arg


def _cmd_pretrain(args) -> int:
    from fedfms.training.pretrain import pretrain

    command = " ".join(["fedfms pretrain", "--out", str(args.out), "--steps", str(args.steps), "--batch-size",
                        str(args.batch_size), "--lr", f"{args.lr:g}", "--seed", str(args.seed)]
                       + (["--threads", str(args.threads)] if args.threads else []))
    pretrain(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
             overwrite=args.overwrite, log=lambda msg: print(msg, flush=True), log_every=args.log_every, command=command)
    return 0


def add_parsers(sub) -> None:
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
