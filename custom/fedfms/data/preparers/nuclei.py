"""Nuclei segmentation in H&E histology: four PanNuke tissues plus MoNuSAC, TNBC and MoNuSeg.

Raw layout (docs/datasets.md)::

    RAW/PanNuke/Fold 1/images/fold1/images.npy   (N, H, W, 3) RGB 0..255
    RAW/PanNuke/Fold 1/images/fold1/types.npy    (N,) tissue names
    RAW/PanNuke/Fold 1/masks/fold1/masks.npy     (N, H, W, 6) instance ids in channels 0-4, 5 = background
    (Fold 2, Fold 3 likewise; any folder depth below 'Fold k' works)

    RAW/<MoNuSAC|TNBC|MoNuSeg>/images/<id>.{png,tif,jpg,bmp}
    RAW/<MoNuSAC|TNBC|MoNuSeg>/masks/<id>.{png,tif,npy,xml}   instance ids, binary, or Aperio XML

The native TNBC (``Slide_XX/`` + ``GT_XX/``) and MoNuSeg (``Tissue Images/*.tif`` + ``Annotations/*.xml``)
releases are read as they are. Every mask becomes one binary ``nuclei`` channel (instance id > 0): the
``instances`` coding of the general image importer (:mod:`fedfms.data.preparers.layout`), whose pairing and
checks these sites share; PanNuke's arrays are read by their own loader.

By default every PanNuke fold and every MoNuSeg image is used. ``pannuke_folds`` restricts the folds per tissue
and ``monuseg_subset='train'`` leaves out the 14 images of the official MoNuSeg 2018 test set; the paper's code
did both (``--preset reference``, :mod:`fedfms.data.preparers.presets`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from fedfms.data import intensity
from fedfms.data.geometry import PAD, check_resize
from fedfms.data.preparers import common, layout, presets
from fedfms.errors import ConfigError, DataError

DATASET = "nuclei"
CLASSES = ["nuclei"]
PANNUKE_TISSUES = ("Adrenal_gland", "Esophagus", "Bile-duct", "Uterus")
OTHER_SITES = {"MoNuSAC": ("MoNuSAC",), "TNBC": ("TNBC",), "MoNuSeg": ("MoNuSeg",)}
SITES = (*PANNUKE_TISSUES, *OTHER_SITES)
PANNUKE_NUCLEUS_CHANNELS = 5  # neoplastic, inflammatory, connective, dead, epithelial; channel 5 is background
_TCGA = re.compile(r"(TCGA-[A-Za-z0-9]{2}-[A-Za-z0-9]{4})")
_TNBC = re.compile(r"(\d+)_\d+")
MONUSEG_SUBSETS = ("all", "train")
# The official MoNuSeg 2018 test set (MoNuSegTestData): 14 tissue images of 7 organs. Everything else released
# for MoNuSeg 2018 is its training set ("MoNuSeg 2018 Training Data", 37 images).
MONUSEG_TEST_IMAGES = (
    "TCGA-2Z-A9J9-01A-01-TS1", "TCGA-44-2665-01B-06-BS6", "TCGA-69-7764-01A-01-TS1", "TCGA-A6-6782-01A-01-BS1",
    "TCGA-AC-A2FO-01A-01-TS1", "TCGA-AO-A0J2-01A-01-BSA", "TCGA-CU-A0YN-01A-02-BSB", "TCGA-EJ-A46H-01A-03-TSC",
    "TCGA-FG-A4MU-01B-01-TS1", "TCGA-GL-6846-01A-01-BS1", "TCGA-HC-7209-01A-01-TS1", "TCGA-HT-8564-01Z-00-DX1",
    "TCGA-IZ-8196-01A-01-BS1", "TCGA-ZF-A9R5-01A-01-TS1",
)


RULE_TCGA, RULE_TNBC, RULE_CSV, RULE_OWN = "TCGA barcode", "TNBC slide number", "patients.csv", "own image"


def patient_rule(stem: str) -> tuple[str, str]:
    """``(patient id, rule)`` implied by a file name: the TCGA participant barcode ``TCGA-XX-XXXX`` at the start
    of the name (MoNuSeg, MoNuSAC), or the slide number ``NN`` of TNBC's ``NN_M`` files; otherwise the image is
    its own patient (rule ``own image``). A ``patients.csv`` overrides all of them (docs/datasets.md)."""
    m = _TCGA.match(stem)
    if m:
        return m.group(1), RULE_TCGA
    m = _TNBC.fullmatch(stem)
    return (m.group(1), RULE_TNBC) if m else (stem, RULE_OWN)


# ----------------------------------------------------------------------------------------------------
# PanNuke


@dataclass
class PanNukeFold:
    number: int
    images_path: Path
    masks_path: Path
    types_path: Path
    types: np.ndarray
    _images: np.ndarray | None = None
    _masks: np.ndarray | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        # Memory-mapped: a fold's masks.npy is several GB of float64 and only a few tissues are used.
        if self._images is None:
            images = common.load_npy(self.images_path, mmap=True)
            masks = common.load_npy(self.masks_path, mmap=True)
            n = len(self.types)
            if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
                raise DataError(f"{self.images_path}: array shape {images.shape}; expected ({n}, H, W, 3) to match {self.types_path.name}")
            if masks.ndim != 4 or masks.shape[:3] != images.shape[:3] or masks.shape[-1] != PANNUKE_NUCLEUS_CHANNELS + 1:
                raise DataError(f"{self.masks_path}: array shape {masks.shape}; "
                                f"expected {images.shape[:3] + (PANNUKE_NUCLEUS_CHANNELS + 1,)} "
                                f"(instance ids in channels 0-4, background in 5)")
            self._images, self._masks = images, masks
        return self._images, self._masks


def _one(folder: Path, name: str) -> Path:
    hits = sorted(p for p in folder.rglob(name) if common.visible(p))
    if len(hits) != 1:
        raise DataError(f"{folder}: found {len(hits)} {name} files; expected exactly one (PanNuke layout 'Fold k/images/foldk/{name}')")
    return hits[0]


def find_pannuke_folds(raw: Path) -> tuple[Path, list[PanNukeFold]]:
    root = common.find_site_dir(raw, "PanNuke", ("PanNuke",), DATASET)
    fold_dirs = []
    for p in sorted(root.iterdir()):
        m = re.fullmatch(r"fold(\d+)", common.norm_name(p.name))
        if p.is_dir() and m:
            fold_dirs.append((int(m.group(1)), p))
    if not fold_dirs:
        found = sorted(p.name for p in root.iterdir() if common.visible(p))
        raise DataError(f"{root}: no 'Fold 1', 'Fold 2', ... folders (found {found or 'nothing'}); "
                        f"expected the PanNuke layout in docs/datasets.md")
    folds = []
    for number, d in fold_dirs:
        types_path = _one(d, "types.npy")
        # types.npy holds strings; older NumPy wrote them as object arrays, which need pickle to load.
        try:
            types = np.load(types_path, allow_pickle=False)
        except ValueError:
            types = common.load_npy(types_path, allow_pickle=True)
        except OSError as exc:
            raise DataError(f"{types_path}: unreadable .npy file ({exc}); expected an array of tissue names") from None
        types = np.asarray(types).astype(str)
        if types.ndim != 1:
            raise DataError(f"{types_path}: array shape {types.shape}; expected (N,) tissue names")
        folds.append(PanNukeFold(number, _one(d, "images.npy"), _one(d, "masks.npy"), types_path, types))
    return root, folds


def _load_pannuke(fold: PanNukeFold, i: int, sample_id: str) -> list[common.Sample]:
    images, masks = fold.arrays()
    image = np.asarray(images[i], dtype=np.float64)
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 255:
        raise DataError(f"{fold.images_path}: image {i} has values outside [0, 255]; expected RGB intensities")
    inst = np.asarray(masks[i][..., :PANNUKE_NUCLEUS_CHANNELS])
    if (inst < 0).any() or not np.isfinite(inst).all() or (inst != np.floor(inst)).any():
        raise DataError(f"{fold.masks_path}: mask {i} has negative or non-integer values; expected instance ids >= 0")
    nuclei = (inst > 0).any(axis=-1).astype(np.uint8)
    rgb = np.rint(image).astype(np.uint8)
    intensity.check_content(rgb, f"{fold.images_path} [patch {i}]", "image")
    # PanNuke gives no patient ids; each patch is its own group (see docs/datasets.md).
    return [common.Sample(rgb, nuclei, sample_id, None, sample_id)]


def parse_pannuke_folds(value) -> str | dict[str, list[int] | str]:
    """Which PanNuke folds each tissue is read from: ``"all"`` (default), or a dict with every tissue of
    :data:`PANNUKE_TISSUES` mapped to its sorted fold numbers or ``"all"``.

    Accepted: ``None``/``"all"``; a string of comma-separated items, ``K`` (folds for every tissue) or
    ``TISSUE=K`` (that tissue; tissue names ignore case and punctuation), several folds joined by ``+``
    (``"Uterus=2+3"``); or such a dict. The paper code's choice:
    ``"Adrenal_gland=2,Esophagus=2,Bile-duct=3,Uterus=3"``."""
    expected = ("expected 'all', fold numbers such as 2 or 2+3, or TISSUE=FOLD items such as "
                "Adrenal_gland=2,Esophagus=2,Bile-duct=3,Uterus=3")
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return "all"
    by_key = {common.norm_name(t): t for t in PANNUKE_TISSUES}

    def folds_of(item) -> list[int] | str:
        if isinstance(item, str) and item.strip().lower() == "all":
            return "all"
        parts = item.split("+") if isinstance(item, str) else ([item] if isinstance(item, int) else item)
        try:
            if isinstance(item, bool) or any(isinstance(x, bool) for x in parts):
                raise ValueError
            numbers = sorted({int(str(x).strip()) for x in parts})
        except (TypeError, ValueError):
            raise ConfigError(f"PanNuke folds {value!r}: {item!r} is not a fold number; {expected}") from None
        if not numbers or numbers[0] < 1:
            raise ConfigError(f"PanNuke folds {value!r}: {item!r} is not a fold number (1, 2, 3); {expected}")
        return numbers

    def tissue_of(name) -> str:
        tissue = by_key.get(common.norm_name(str(name)))
        if tissue is None:
            raise ConfigError(f"PanNuke folds {value!r}: unknown tissue {name!r}; expected some of {', '.join(PANNUKE_TISSUES)}")
        return tissue

    default: list[int] | str = "all"
    chosen: dict[str, list[int] | str] = {}
    if isinstance(value, dict):
        for name, item in value.items():
            chosen[tissue_of(name)] = folds_of(item)
    elif isinstance(value, str):
        for item in (x.strip() for x in value.split(",")):
            if not item:
                continue
            if "=" in item:
                name, _, folds = item.partition("=")
                tissue = tissue_of(name.strip())
                add = folds_of(folds.strip())
                old = chosen.get(tissue, [])
                chosen[tissue] = "all" if "all" in (add, old) else sorted(set(old) | set(add))
            else:
                default = folds_of(item) if default == "all" else sorted(set(default) | set(folds_of(item)))
    else:
        raise ConfigError(f"PanNuke folds {value!r}; {expected}")
    out = {t: chosen.get(t, default) for t in PANNUKE_TISSUES}
    return "all" if all(v == "all" for v in out.values()) else out


def pannuke_source(tissue: str, folds: list[PanNukeFold], root: Path, wanted: list[int] | str = "all") -> common.SiteSource:
    if wanted != "all":
        present = sorted(f.number for f in folds)
        missing = [k for k in wanted if k not in present]
        if missing:
            raise DataError(f"{root}: no PanNuke fold {', '.join(map(str, missing))} (PanNuke folds for {tissue}: "
                            f"{'+'.join(map(str, wanted))}); found folds {present}; expected 'Fold k' folders as in docs/datasets.md")
        folds = [f for f in folds if f.number in wanted]
    cases = []
    for fold in folds:
        for i in np.flatnonzero(fold.types == tissue):
            sid = f"fold{fold.number}_{int(i):05d}"
            cases.append(common.Case(sid, fold.images_path, partial(_load_pannuke, fold, int(i), sid),
                                     (fold.images_path, fold.masks_path)))
    if not cases:
        found = sorted({t for f in folds for t in f.types.tolist()})
        only = "" if wanted == "all" else f" (PanNuke folds for {tissue}: {'+'.join(map(str, wanted))})"
        raise DataError(f"{root}: no PanNuke patches of tissue {tissue!r} in {', '.join(str(f.types_path) for f in folds)}{only}; "
                        f"found tissues {found}")
    extra = {f"fold {f.number} types.npy": f.types_path for f in folds}
    return common.SiteSource(tissue, root, cases, extra_files=extra, notes={"patient_ids": {"own patch": len(cases)}})


# ----------------------------------------------------------------------------------------------------
# image + mask sites


def read_nuclei_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Instance ids, binary or colour-coded masks (channel maximum), or Aperio XML polygons drawn at the image size."""
    if path.suffix.lower() == ".xml":
        return common.rasterise_xml(path, *size)
    return common.read_label_image(path, palette="index", colour="max")


# every mask becomes one binary class: instance id > 0
RECIPE = layout.ImageRecipe(tuple(CLASSES), partial(layout.classes_from_labels, classes=CLASSES, coding="instances"),
                            read_mask=read_nuclei_mask)


def _pairs_normalised(site_dir: Path, subdirs: dict[str, Path]):
    if "masks" not in subdirs:
        raise DataError(f"{site_dir}: has images/ but no masks/ folder; expected images/ and masks/ with matching file names")
    return layout.find_image_pairs(site_dir, mask_exts=(*common.MASK_EXTS, ".xml"))


def _pairs_tnbc(site_dir: Path, subdirs: dict[str, Path]):
    pairs, problems, slides = [], [], {}
    for key, slide in sorted(subdirs.items()):
        if not key.startswith("slide"):
            continue
        number = key[len("slide"):]
        gt = subdirs.get("gt" + number)
        if gt is None:
            problems.append(common.Problem(slide, f"no matching GT_{number} folder; expected TNBC's Slide_XX/GT_XX pairs"))
            continue
        p, q = common.pair_files(common.list_files(slide, common.IMAGE_EXTS), common.list_files(gt, common.MASK_EXTS))
        pairs += p
        slides.update({pair.id: number for pair in p})
        problems += q
    return pairs, problems, slides


def _pairs_xml(site_dir: Path):
    pairs, problems = [], []
    for image in sorted(site_dir.rglob("*")):
        if not (image.is_file() and common.visible(image) and image.suffix.lower() in common.IMAGE_EXTS):
            continue
        candidates = [image.with_suffix(".xml"), image.parent.parent / "Annotations" / f"{image.stem}.xml"]
        xml = next((c for c in candidates if c.is_file()), None)
        if xml is None:
            problems.append(common.Problem(image, "no XML annotation; expected <id>.xml beside it or in a sibling Annotations/ folder"))
        else:
            pairs.append(common.Pair(image.stem, image, (xml,)))
    return pairs, problems


def is_monuseg_test_image(stem: str) -> bool:
    """Whether ``stem`` names an image (or a tile of one) of the official MoNuSeg 2018 test set."""
    return stem.upper().startswith(MONUSEG_TEST_IMAGES)


def find_image_cases(site: str, site_dir: Path, monuseg_subset: str = "all") -> common.SiteSource:
    subdirs = layout.subfolders(site_dir)
    slides: dict[str, str] = {}  # TNBC: image id -> slide number (the patient)
    if "images" in subdirs:
        pairs, problems = _pairs_normalised(site_dir, subdirs)
    elif any(k.startswith("slide") for k in subdirs):
        pairs, problems, slides = _pairs_tnbc(site_dir, subdirs)
    elif any(p.suffix.lower() == ".xml" for p in site_dir.rglob("*.xml")):
        pairs, problems = _pairs_xml(site_dir)
    else:
        raise DataError(
            f"{site_dir}: subfolders are {sorted(p.name for p in subdirs.values()) or 'none'}; expected images/ + masks/ "
            f"(or TNBC Slide_XX/ + GT_XX/, or MoNuSeg Tissue Images/ + Annotations/), see docs/datasets.md"
        )
    left_out = []
    if monuseg_subset == "train":
        left_out = sorted(p.id for p in pairs if is_monuseg_test_image(p.id))
        if left_out and len(left_out) == len(pairs):
            raise DataError(
                f"{site_dir}: all {len(pairs)} image(s) are in the MoNuSeg 2018 test set ({', '.join(left_out[:3])}"
                f"{', ...' if len(left_out) > 3 else ''}), which --monuseg-subset train leaves out; expected the training "
                f"images ('MoNuSeg 2018 Training Data')"
            )
        pairs = [p for p in pairs if not is_monuseg_test_image(p.id)]
        problems = [p for p in problems if not is_monuseg_test_image(p.path.stem)]
        if left_out:
            common.info(f"{DATASET}/{site}: left out {len(left_out)} image(s) of the MoNuSeg 2018 test set (monuseg subset train)")
    stems = {}
    for pair in pairs:
        if pair.id in stems:
            raise DataError(f"{pair.image}: image id {pair.id!r} also used by {stems[pair.id]}; expected unique file names within a site")
        stems[pair.id] = pair.image
    patients = common.load_patient_map(site_dir)
    cases, rules = [], {}
    for pair in pairs:
        patient, rule = (slides[pair.id], RULE_TNBC) if pair.id in slides else patient_rule(pair.id)
        if pair.id in patients:
            patient, rule = patients[pair.id], RULE_CSV
        rules[rule] = rules.get(rule, 0) + 1
        cases.append(layout.image_case(pair, patient, RECIPE))
    own = rules.get(RULE_OWN, 0)
    if own:
        common.warn(
            f"{site_dir}: {own} of {len(cases)} image name(s) carry no TCGA barcode or TNBC slide number and no "
            f"{common.PATIENTS_CSV} lists them, so each is its own patient (tiles of one slide may land in both train "
            f"and val); add {site_dir / common.PATIENTS_CSV} (columns image,patient) to group them"
        )
    extra = {common.PATIENTS_CSV: site_dir / common.PATIENTS_CSV} if (site_dir / common.PATIENTS_CSV).is_file() else {}
    notes = {"patient_ids": dict(sorted(rules.items()))}
    if monuseg_subset == "train":
        notes["monuseg_test_images_left_out"] = left_out
    return common.SiteSource(site, site_dir, cases, problems, extra_files=extra, notes=notes)


def prepare_nuclei(
    raw: Path,
    out: Path,
    *,
    image_size: int = 1024,
    mask_size: int = 256,
    overwrite: bool = False,
    sites=None,
    pannuke_folds=None,
    monuseg_subset: str = "all",
    skip_bad_cases: bool = False,
    mask_resize: str = common.DEFAULT_MASK_RESIZE,
    preset: str = presets.PROJECT,
    resize: str = PAD,
) -> list[Path]:
    """Prepare the nuclei sites (four PanNuke tissues, MoNuSAC, TNBC, MoNuSeg); one binary class.

    ``pannuke_folds``: the PanNuke folds each tissue is read from (:func:`parse_pannuke_folds`; default all).
    ``monuseg_subset``: ``"all"`` (default) or ``"train"``, leaving out the official MoNuSeg 2018 test images.
    ``mask_resize``: the masks' nearest-neighbour rule (``"nearest-exact"``, or ``"nearest"`` = OpenCV's INTER_NEAREST).
    ``preset='reference'`` requires the paper code's values for all three (:mod:`~fedfms.data.preparers.presets`)."""
    raw, out = Path(raw), Path(out)
    folds_by_tissue = parse_pannuke_folds(pannuke_folds)
    if monuseg_subset not in MONUSEG_SUBSETS:
        raise ConfigError(f"monuseg subset is {monuseg_subset!r}; expected one of {', '.join(MONUSEG_SUBSETS)}")
    mask_resize = common.check_mask_resize(mask_resize)
    presets.check(DATASET, presets.check_name(preset), {"pannuke_folds": folds_by_tissue, "monuseg_subset": monuseg_subset,
                                                         "mask_resize": mask_resize, "resize": check_resize(resize)})
    chosen = common.select_sites(sites, list(SITES), DATASET)
    # Resolve every folder before writing anything, so a layout mistake fails fast.
    pannuke_root, folds = find_pannuke_folds(raw) if any(s in PANNUKE_TISSUES for s in chosen) else (None, [])
    site_dirs = {s: common.find_site_dir(raw, s, OTHER_SITES[s], DATASET) for s in chosen if s in OTHER_SITES}
    settings = {"preset": preset, "mask_resize": mask_resize, "intensity": "RGB / 255", "label_map": "instance id > 0 -> nuclei"}

    def sources():
        for site in chosen:
            if site in PANNUKE_TISSUES:
                wanted = "all" if folds_by_tissue == "all" else folds_by_tissue[site]
                yield (pannuke_source(site, folds, pannuke_root, wanted),
                       {**settings, "pannuke_tissue": site, "pannuke_folds": wanted})
            elif site == "MoNuSeg":
                yield find_image_cases(site, site_dirs[site], monuseg_subset), {**settings, "monuseg_subset": monuseg_subset}
            else:
                yield find_image_cases(site, site_dirs[site]), settings

    return common.write_sites(
        sources(),
        out=out, dataset=DATASET, classes=CLASSES, image_size=image_size, mask_size=mask_size,
        overwrite=overwrite, skip_bad_cases=skip_bad_cases, resize=resize,
    )
