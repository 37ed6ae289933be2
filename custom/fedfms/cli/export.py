"""``fedfms export bundle``: a finished run's model as a MONAI bundle with its model card (fedfms.bundle).

The main CLI calls :func:`add_parsers`; problems a user can fix raise :class:`fedfms.errors.FedFMSError` for the
main CLI to print as one line."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  fedfms export bundle demo_out/runs/<time>/fedmsa/workspace bundles/fedmsa --data-root demo_out/sites
  fedfms export bundle runs/prostate bundles/prostate_best --model best --sam-checkpoint /models/sam_vit_b_01ec64.pth
  cd bundles/fedmsa && python -m monai.bundle run --config_file configs/inference.json \\
      --dataset_dir /data/new_cases --output_dir /data/masks
"""


def _cmd_export_bundle(args) -> int:
    from fedfms.bundle import export_bundle

    out = export_bundle(args.run, args.out, model=args.model, personal=args.personal, job=args.job,
                        data_root=args.data_root, sam_checkpoint=args.sam_checkpoint, class_names=args.classes,
                        two_and_half_d=True if args.two_and_half_d else None, overwrite=args.overwrite,
                        resize=args.resize)
    print(f"wrote {out} (MONAI bundle; model card in {out / 'docs' / 'model_card.md'})")
    print(f"run it: cd {out} && python -m monai.bundle run --config_file configs/inference.json "
          "--dataset_dir INPUTS --output_dir MASKS")
    return 0


def add_parsers(sub) -> None:
    export = sub.add_parser("export", help="a finished run's model for use outside the federation").add_subparsers(
        dest="export_command", required=True)
    p = export.add_parser("bundle", help="the final, best or a personalised model as a MONAI bundle (configs/inference.json "
                                         "runs with python -m monai.bundle run; docs/model_card.md says what made it)",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run: simulator workspace, server run folder or downloaded job result")
    p.add_argument("out", help="the bundle folder to write (replaced only with --overwrite)")
    p.add_argument("--model", choices=["final", "best"], default="final",
                   help="the final global model (default) or the best one FLARE's selector kept")
    p.add_argument("--personal", metavar="PATH", help="instead: a site's personalised model file (its card is the run's)")
    p.add_argument("--job", help="the job folder the run used (default: the configs deployed in the run's workspace)")
    p.add_argument("--data-root", help="the sites' prepared folders: class names, 2.5D setting and the card's sample "
                                       "counts and presets from their manifests")
    p.add_argument("--sam-checkpoint", help="the SAM checkpoint the bundle names for FedMSA's frozen encoder (default: the "
                                            "run's); read here, when present, to record the encoder's fingerprint")
    p.add_argument("--classes", nargs="+", help="class names for the output files (default: the manifests', or class0, ...)")
    p.add_argument("--two-and-half-d", action="store_true", help="the model was trained on 2.5D inputs (default: from the "
                                                                 "manifests)")
    p.add_argument("--resize", choices=["pad", "stretch"], help="how the sites' images became squares: pad (aspect ratio "
                                                                 "kept, SAM's way) or stretch (default: the manifests', else pad)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.set_defaults(func=_cmd_export_bundle)
