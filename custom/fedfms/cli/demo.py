"""``fedfms demo``: the offline MNI152 demo (``fedfms.demo``)."""

from __future__ import annotations

from fedfms.config import positive_int_arg


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


def add_parsers(sub) -> None:
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
