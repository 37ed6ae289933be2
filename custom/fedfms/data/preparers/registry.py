"""Dataset name -> preparer, and :func:`prepare`, the entry point behind ``fedfms prepare``.

A preparer is ``fn(raw, out, *, image_size, mask_size, overwrite, sites, **dataset_options) -> list[Path]``
returning the site folders ``out/<site>`` it wrote or found already prepared. ``images`` and ``volumes`` read a
hospital's own data (:mod:`fedfms.data.preparers.own`); the public datasets are layouts over the same importer
(:mod:`fedfms.data.preparers.layout`). The public datasets' preparers take a ``preset`` option too
(:mod:`fedfms.data.preparers.presets`): :func:`prepare` fills in the options the preset sets, and the preparer
refuses options that contradict it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from fedfms.data.preparers import common, presets
from fedfms.data.preparers.fets import prepare_fets
from fedfms.data.preparers.fundus import prepare_fundus
from fedfms.data.preparers.mni_demo import build_raw as build_demo_raw
from fedfms.data.preparers.mni_demo import prepare_demo
from fedfms.data.preparers.nuclei import prepare_nuclei
from fedfms.data.preparers.own import prepare_images, prepare_volumes
from fedfms.data.preparers.prostate import prepare_prostate
from fedfms.errors import ConfigError, DataError
from fedfms.config import missing_folders

PREPARERS: dict[str, Callable[..., list[Path]]] = {
    "images": prepare_images,  # your own 2D data: RAW/<site>/images + masks (docs/data-format.md)
    "volumes": prepare_volumes,  # your own 3D NIfTI data: RAW/<site>/images + labels
    "prostate": prepare_prostate,
    "fets": prepare_fets,
    "fundus": prepare_fundus,
    "nuclei": prepare_nuclei,
    "mni-demo": prepare_demo,  # the offline demo: builds its raw volumes from nilearn's MNI152 template
}

# Datasets whose raw files this package makes itself (offline demo): built into --raw on first use.
BUILDS_OWN_RAW = {"mni-demo": build_demo_raw}

COMMON_PARAMS = ("raw", "out", "image_size", "mask_size", "overwrite", "sites")
OWN_DATA = ("images", "volumes")  # a hospital's own data, one folder per site; the others are public datasets


def dataset_options(dataset: str) -> dict[str, object]:
    """The dataset-specific keyword options of a preparer and their defaults."""
    fn = _lookup(dataset)
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if name not in COMMON_PARAMS and p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _lookup(dataset: str):
    try:
        return PREPARERS[dataset]
    except KeyError:
        raise ConfigError(f"unknown dataset {dataset!r}; expected one of {', '.join(PREPARERS)}") from None


def prepare(
    dataset: str,
    raw: Path,
    out: Path,
    *,
    image_size: int = 1024,
    mask_size: int = 256,
    overwrite: bool = False,
    sites=None,
    summary: bool = True,
    **options,
) -> list[Path]:
    """Prepare ``dataset`` from the download in ``raw`` into ``out/<site>/`` folders; returns them.

    Sites already prepared with the same settings are skipped; other existing outputs are an error
    unless ``overwrite``. ``preset="reference"`` (an option of the public datasets) adds the paper code's values
    of the options it sets (:mod:`fedfms.data.preparers.presets`). A summary table (sites, volumes, samples,
    positive fraction) is printed."""
    fn = _lookup(dataset)
    unknown = sorted(set(options) - set(dataset_options(dataset)))
    if unknown:
        raise ConfigError(f"option(s) {', '.join(unknown)} do not apply to dataset {dataset}; "
                          f"expected some of {', '.join(dataset_options(dataset)) or 'none'}")
    options = presets.fill(dataset, options.get("preset"), options)
    for name, value in (("image_size", image_size), ("mask_size", mask_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} is {value!r}; expected a positive integer (paper: image 1024, mask 256)")
    raw, out = Path(raw), Path(out)
    layout_help = "docs/data-format.md" if dataset in OWN_DATA else "docs/datasets.md"
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: output is a file; expected a folder to hold one sub-folder per site (the file is left alone)")
    if dataset in BUILDS_OWN_RAW:
        try:
            BUILDS_OWN_RAW[dataset](raw)
        except OSError as exc:
            raise DataError(f"{exc.filename or raw}: cannot write the demo's raw volumes ({exc.strerror or exc}); "
                            f"expected a writable --raw folder") from None
    if raw.exists() and not raw.is_dir():
        raise DataError(f"{raw}: raw path is a file; "
                        f"expected the folder holding the {dataset} data (layout in {layout_help})")
    if not raw.is_dir():
        raise DataError(f"{raw}: raw folder does not exist; expected the {dataset} data (layout in {layout_help})")
    if out.resolve() == raw.resolve():
        # site folders would land among the raw site folders and be read back as raw data next time
        raise DataError(f"{out}: output folder is the raw folder; expected a separate output folder")
    made = missing_folders(out)
    try:
        written = fn(raw, out, image_size=image_size, mask_size=mask_size, overwrite=overwrite, sites=sites, **options)
    except OSError as exc:
        _remove_empty(made)
        raise DataError(f"{exc.filename or out}: {exc.strerror or exc} (while preparing {dataset}); "
                        f"nothing half-written was kept") from None
    except BaseException:
        _remove_empty(made)  # an OUT folder this run created and left empty goes again
        raise
    if summary:
        common.print_summary(dataset, written)
    return written



def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; rmdir never removes a folder that holds anything
        try:
            folder.rmdir()
        except OSError:
            return
