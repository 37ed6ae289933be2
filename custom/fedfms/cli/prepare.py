"""``fedfms prepare DATASET --raw DIR --out DIR``: your own data (``images``, ``volumes``) or a raw public download ->
prepared site folders.

The main CLI calls :func:`add_parsers` and dispatches to ``args.func(args)``, which returns an
exit code. Data problems raise :class:`fedfms.errors.DataError` for the main CLI to print; misuse of the
options (an option of another dataset, an unknown site, low >= high percentile) is reported by argparse
with exit code 2.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from fedfms.errors import ConfigError, DataError
from fedfms.config import positive_int_arg

DATASET_HELP = {
    "images": "your own 2D data: RAW/<site>/images/ + masks/ (PNG, JPG, 8/16-bit TIFF; docs/data-format.md)",
    "volumes": "your own 3D NIfTI data: RAW/<site>/images/ + labels/ (docs/data-format.md)",
    "prostate": "6-site prostate T2 MRI (BIDMC, HK, I2CVB, ISBI, ISBI1.5, UCL)",
    "fets": "FeTS2022 brain tumour, T1ce -> enhancing tumour (label 4; reference preset: labels 1+4), clients 1,6,18,21",
    "fundus": "optic disc/cup: REFUGE, ORIGA, G1020, Drishti-GS1",
    "nuclei": "nuclei: PanNuke Adrenal_gland/Esophagus/Bile-duct/Uterus, MoNuSAC, TNBC, MoNuSeg",
}

EPILOG = """\
examples:
  fedfms prepare images  --raw data/raw/my_tiles --out data/my_tiles --classes nuclei
  fedfms prepare images  --raw data/raw/my_fundus --out data/my_fundus --classes disc,cup
  fedfms prepare images  --raw data/raw/my_16bit --out data/my_16bit --window
  fedfms prepare volumes --raw data/raw/my_ct --out data/my_ct --classes liver,tumour
  fedfms prepare prostate --raw data/raw/prostate --out data/prostate
  fedfms prepare fets --raw data/raw/FeTS2022 --out data/fets --two-and-half-d --empty-slices-keep 0.1
  fedfms prepare fundus --raw data/raw/fundus --out data/fundus --sites REFUGE ORIGA
  fedfms prepare nuclei --raw data/raw/nuclei --out data/nuclei --image-size 512 --mask-size 128
  fedfms prepare fets --raw data/raw/FeTS2022 --out data/fets_ref --preset reference

Presets: --preset project (default) is this project's preprocessing, which the options change; --preset
reference is the paper code's (LIU-YUXI/FedFMS) for every point where it differs (docs/datasets.md, "Presets");
an option that contradicts it is refused. The manifest records the preset.

Your own data: one folder per site, images/ and masks/ (volumes: labels/) paired by file name; masks 0/255 or 0/1
for one class, 0..C for several, or one file per class <id>_<class> (docs/data-format.md). Images keep their
aspect ratio (longest side to --image-size, then zero padding at the bottom/right, as SAM does; --resize stretch
scales both sides instead, as the paper code did: --preset reference).

Public raw folder layouts and sources: docs/datasets.md. Re-running is safe: sites already prepared
with the same settings from the same raw files are skipped; different settings, or raw cases added,
removed or edited since, are an error saying what changed (--overwrite re-prepares).
"""

# argparse dest -> preparer keyword, for the options that only some datasets take
DATASET_OPTIONS = {
    "low_pct": "--low-pct",
    "high_pct": "--high-pct",
    "empty_slices_keep": "--empty-slices-keep",
    "two_and_half_d": "--two-and-half-d",
    "skip_end_slices": "--skip-end-slices",
    "target_labels": "--target-labels",
    "pannuke_folds": "--pannuke-folds",
    "monuseg_subset": "--monuseg-subset",
    "preset": "--preset",
    "partition_csv": "--partition-csv",
    "clients": "--clients",
    "disc_includes_cup": "--disc-includes-cup",
    "mask_coding": "--mask-coding",
    "skip_bad_cases": "--skip-bad-cases",
    "mask_resize": "--mask-resize",
    "classes": "--classes",
    "window": "--window",
    "resize": "--resize",
}



def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 100]")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true/false")


def _checked_by(module: str, parser: str, keep_text: bool = True):
    """An argparse type from a preparer's own parser (imported when the option is used): its ConfigError becomes
    argparse's one-line error; the option keeps the text (``keep_text``) or the parsed value."""

    def convert(text: str):
        import importlib

        try:
            value = getattr(importlib.import_module(module), parser)(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text if keep_text else value

    return convert


_empty_keep = _checked_by("fedfms.data.volumes", "parse_empty_keep")
_target_labels = _checked_by("fedfms.data.preparers.fets", "parse_target_labels", keep_text=False)
_pannuke_folds = _checked_by("fedfms.data.preparers.nuclei", "parse_pannuke_folds")
_classes = _checked_by("fedfms.data.preparers.layout", "parse_classes", keep_text=False)


def add_parsers(subparsers) -> argparse.ArgumentParser:
    from fedfms.data.preparers.registry import PREPARERS

    p = subparsers.add_parser(
        "prepare",
        help="convert your own images/volumes or a raw public dataset into prepared site folders",
        description="Convert your own data or a raw public dataset into one prepared site folder per site (OUT/<site>/).\n\n"
        + "\n".join(f"  {name:9s} {DATASET_HELP.get(name, '')}" for name in PREPARERS),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", choices=list(PREPARERS), help="which dataset to prepare")
    p.add_argument("--raw", required=True, type=Path, help="folder holding the raw data: one folder per site for images/"
                   "volumes (docs/data-format.md), the download for a public dataset (docs/datasets.md)")
    p.add_argument("--out", required=True, type=Path, help="output folder; one sub-folder per site")
    p.add_argument("--image-size", type=positive_int_arg, default=1024, help="image side in pixels, bilinear (default 1024)")
    p.add_argument("--mask-size", type=positive_int_arg, default=256, help="mask side in pixels, nearest (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace site outputs that already exist")
    p.add_argument("--sites", nargs="+", metavar="SITE", help="only these sites (space or comma separated; default all)")
    p.add_argument(
        "--skip-bad-cases", action="store_true", default=None,
        help="warn about and leave out unreadable/inconsistent cases instead of stopping (listed in the manifest)",
    )
    p.add_argument(
        "--resize", choices=["pad", "stretch"], default=None,
        help="pad: keep the aspect ratio, longest side to --image-size, zeros padded at the bottom/right (SAM's way; "
        "default); stretch: both sides to the square (the paper code's way, set by --preset reference)",
    )

    p.add_argument(
        "--mask-resize", choices=["nearest-exact", "nearest"], default=None,
        help="masks' nearest-neighbour rule (prostate, fets, fundus, nuclei): nearest-exact (default) or nearest "
        "(OpenCV's INTER_NEAREST, the paper code's)",
    )
    p.add_argument(
        "--preset", choices=["project", "reference"], default=None,
        help="project: this project's preprocessing (default; options change it); reference: the paper code's "
        "preprocessing for this dataset (docs/datasets.md, 'Presets'); the manifest records it",
    )

    o = p.add_argument_group("your own data (images, volumes)")
    o.add_argument("--classes", type=_classes, default=None, metavar="A[,B]",
                   help="class names in mask order (default: one class, foreground): index-coded masks use 1 for the "
                   "first, 2 for the second, ...; per-class mask files are named <id>_<class>")
    o.add_argument("--window", action="store_true", default=None,
                   help="images: map each image's own 1st..99th percentile (--low-pct/--high-pct) to [0, 1]; needed "
                   "for 16-bit and float images")

    g = p.add_argument_group("3D volumes (prostate, fets, volumes); --window of images")
    g.add_argument("--low-pct", type=_percent, default=None, help="lower intensity-window percentile per volume (default 1)")
    g.add_argument("--high-pct", type=_percent, default=None, help="upper intensity-window percentile per volume (default 99)")
    g.add_argument(
        "--two-and-half-d", action="store_true", default=None,
        help="2.5D input: slices k-1, k, k+1 as the three channels (the reference code's FeTS setting)",
    )
    g.add_argument(
        "--empty-slices-keep", type=_empty_keep, default=None, metavar="N|F|all",
        help="slices without target to keep per volume: 'all' (default), an integer count N, "
        "or a fraction F in [0,1] written with a decimal point (0.1 = 10%%), picked evenly through the volume; "
        "or every:N, the slices whose index is a multiple of N (the paper code's FeTS rule: every:5)",
    )
    g.add_argument(
        "--skip-end-slices", action="store_true", default=None,
        help="never keep the first and last slice of a volume (the paper code's FeTS rule)",
    )

    f = p.add_argument_group("fets")
    f.add_argument("--partition-csv", default=None, help="partitioning CSV (name or path; default partitioning_1.csv)")
    f.add_argument("--clients", default=None, help="partition ids to prepare (default 1,6,18,21)")
    f.add_argument(
        "--target-labels", type=_target_labels, default=None, metavar="L[,L]",
        help="segmentation labels that form the target: 4 = enhancing tumour (default), 1,4 = tumour core "
        "(the paper code's target), 1,2,4 = whole tumour",
    )

    u = p.add_argument_group("fundus")
    u.add_argument(
        "--disc-includes-cup", type=_bool, default=None, metavar="{true,false}",
        help="disc channel covers the whole optic disc including the cup (default true); false = rim only",
    )
    u.add_argument(
        "--mask-coding", choices=["refuge", "index", "auto", "instances"], default=None,
        help="mask values. fundus: refuge = 0 cup/128 rim/255 background (default); index = 0 background/1 rim/2 cup. "
        "images, volumes: auto = 0/255 or 0/1 for one class, 0..C for several (default); instances = one class, "
        "every id > 0",
    )
    n = p.add_argument_group("nuclei")
    n.add_argument(
        "--pannuke-folds", type=_pannuke_folds, default=None, metavar="SPEC",
        help="PanNuke folds to read: all (default), fold numbers for every tissue (2 or 2+3), or TISSUE=FOLD items "
        "(the paper code: Adrenal_gland=2,Esophagus=2,Bile-duct=3,Uterus=3)",
    )
    n.add_argument(
        "--monuseg-subset", choices=["all", "train"], default=None,
        help="MoNuSeg images: all (default) or train (the 14 MoNuSeg 2018 test images left out, as the paper code)",
    )
    p.set_defaults(func=partial(run_prepare, parser=p))
    return p


def _split_sites(sites):
    if not sites:
        return None
    return [s for item in sites for s in item.split(",") if s.strip()]


def run_prepare(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    from fedfms.data.preparers.registry import dataset_options, prepare

    def fail(msg: str):
        if parser is None:
            raise ConfigError(msg)
        parser.error(msg)  # exits with code 2

    accepted = dataset_options(args.dataset)
    options = {}
    for dest, flag in DATASET_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest not in accepted:
            fail(f"{flag} does not apply to dataset {args.dataset}")
        options[dest] = value
    try:
        prepare(
            args.dataset, args.raw, args.out,
            image_size=args.image_size, mask_size=args.mask_size, overwrite=args.overwrite,
            sites=_split_sites(args.sites), **options,
        )
    except ConfigError as exc:
        fail(str(exc))
    except OSError as exc:  # anything the preparers did not already turn into a DataError naming the file
        raise DataError(f"{exc.filename or args.out}: {exc.strerror or exc}; nothing half-written was kept") from None
    return 0
