"""FeTS2022 brain tumour MRI, partitioned into clients by the challenge's partitioning CSV.

Raw layout (docs/datasets.md)::

    RAW/MICCAI_FeTS2022_TrainingData/partitioning_1.csv          columns Partition_ID,Subject_ID
    RAW/MICCAI_FeTS2022_TrainingData/<Subject_ID>/<Subject_ID>_t1ce.nii.gz
    RAW/MICCAI_FeTS2022_TrainingData/<Subject_ID>/<Subject_ID>_seg.nii.gz

``RAW`` may also be the training-data folder itself, and the CSVs may sit in ``RAW``. Input is T1ce,
target the enhancing tumour (label 4) by default; the other tumour labels (1 necrosis, 2 oedema) are background.
``target_labels`` chooses other labels: ``[1, 4]`` is the tumour core, the paper code's target
(``--preset reference``, :mod:`fedfms.data.preparers.presets`). A layout over the general volume importer
(:mod:`fedfms.data.preparers.layout`): subjects found through the partitioning CSV, the chosen labels as one class.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np

from fedfms.data import volumes as vol
from fedfms.data.geometry import PAD, check_resize
from fedfms.data.preparers import common, layout, presets
from fedfms.errors import ConfigError, DataError

DATASET = "fets"
CLASSES = ["enhancing_tumour"]  # with the default target; class_name() for others
TRAINING_DIR = "MICCAI_FeTS2022_TrainingData"
DEFAULT_PARTITION_CSV = "partitioning_1.csv"
DEFAULT_CLIENTS = (1, 6, 18, 21)
MODALITY = "t1ce"
TARGET_LABEL = 4
ALLOWED_LABELS = (0, 1, 2, 4)
TUMOUR_LABELS = (1, 2, 4)  # 1 necrosis / non-enhancing core, 2 oedema, 4 enhancing tumour
# the BraTS regions by their labels; another combination is named after its labels
REGION_NAMES = {(4,): "enhancing_tumour", (1, 4): "tumour_core", (1, 2, 4): "whole_tumour"}


def parse_target_labels(value) -> list[int]:
    """The segmentation labels that form the target, as a sorted list: default ``[4]`` (enhancing tumour);
    ``"1,4"`` / ``[1, 4]`` is the tumour core (the paper code's target); any non-empty subset of 1, 2, 4."""
    if value is None:
        return [TARGET_LABEL]
    items = str(value).replace(",", " ").replace("+", " ").split() if isinstance(value, (str, int)) else value
    expected = ("expected a non-empty subset of 1 (necrosis), 2 (oedema), 4 (enhancing tumour), "
                "such as 4 (default) or 1,4 (tumour core, the paper code's target)")
    try:
        if isinstance(value, bool) or any(isinstance(v, bool) for v in items):
            raise ValueError
        labels = sorted({int(str(v).strip()) for v in items})
    except (TypeError, ValueError):
        raise ConfigError(f"target labels are {value!r}; {expected}") from None
    if not labels or not set(labels) <= set(TUMOUR_LABELS):
        raise ConfigError(f"target labels are {value!r}; {expected}")
    return labels


def class_name(labels: list[int]) -> str:
    return REGION_NAMES.get(tuple(labels), "tumour_labels_" + "_".join(str(v) for v in labels))


def _label_map(labels: list[int]) -> str:
    rest = [v for v in (0, *TUMOUR_LABELS) if v not in labels]
    return (f"seg {'== ' + str(labels[0]) if len(labels) == 1 else 'in {' + ','.join(map(str, labels)) + '}'} -> {class_name(labels)}; "
            f"{'/'.join(map(str, rest))} -> background")


def site_name(client: int) -> str:
    return f"client{client}"


def parse_clients(clients) -> list[int]:
    if clients is None:
        return list(DEFAULT_CLIENTS)
    items = clients.replace(",", " ").split() if isinstance(clients, str) else list(clients)
    try:
        parsed = [int(str(c).strip()) for c in items]
    except ValueError:
        raise ConfigError(f"clients is {clients!r}; expected partition ids such as 1,6,18,21") from None
    if not parsed:
        raise ConfigError("clients is empty; expected at least one partition id")
    return list(dict.fromkeys(parsed))


def find_data_dir(raw: Path) -> Path:
    nested = raw / TRAINING_DIR
    if nested.is_dir():
        return nested
    if any(p.is_dir() and _nifti(p, f"{p.name}_{MODALITY}") for p in raw.iterdir()):
        return raw
    found = sorted(p.name for p in raw.iterdir() if common.visible(p))[:8]
    raise DataError(
        f"{raw}: no {TRAINING_DIR}/ folder and no <Subject_ID>/<Subject_ID>_{MODALITY}.nii.gz subject folders (found {found}); "
        f"expected the FeTS2022 layout in docs/datasets.md"
    )


def find_partition_csv(raw: Path, data_dir: Path, partition_csv) -> Path:
    if partition_csv is not None and (Path(partition_csv).is_absolute() or Path(partition_csv).parent != Path(".")):
        path = Path(partition_csv)
        if not path.is_file():
            raise DataError(f"{path}: partition CSV is missing; expected a file with columns Partition_ID,Subject_ID")
        return path
    name = str(partition_csv or DEFAULT_PARTITION_CSV)
    for folder in (data_dir, raw, Path.cwd()):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{data_dir / name}: partition CSV is missing (also looked in {raw}); "
                    f"expected the FeTS2022 {name} with columns Partition_ID,Subject_ID")


def read_partitions(path: Path) -> dict[int, list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "Partition_ID" not in columns or "Subject_ID" not in columns:
                raise DataError(f"{path}: columns are {columns}; expected Partition_ID,Subject_ID")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc}); expected columns Partition_ID,Subject_ID") from None
    parts: dict[int, list[str]] = defaultdict(list)
    seen: dict[str, tuple[int, int]] = {}
    for line, row in enumerate(rows, start=2):
        pid, sid = row.get("Partition_ID", ""), row.get("Subject_ID", "")
        if not pid and not sid:
            continue
        try:
            parts[int(float(pid))].append(sid)
        except ValueError:
            raise DataError(f"{path}: line {line} has Partition_ID {pid!r}; expected an integer") from None
        if not sid:
            raise DataError(f"{path}: line {line} has an empty Subject_ID; expected a subject folder name")
        if sid in seen:
            first_line, first_pid = seen[sid]
            raise DataError(f"{path}: line {line} lists Subject_ID {sid} again (line {first_line}, partition {first_pid}); "
                            f"expected each subject once, so no patient is at two sites")
        seen[sid] = (line, int(float(pid)))
    if not parts:
        raise DataError(f"{path}: no rows; expected Partition_ID,Subject_ID rows")
    return dict(parts)


def _nifti(folder: Path, name: str) -> Path | None:
    for suffix in vol.NIFTI_SUFFIXES:
        if (folder / (name + suffix)).is_file():
            return folder / (name + suffix)
    return None


def to_target(seg: np.ndarray, seg_path: Path, *, target_labels=(TARGET_LABEL,)) -> np.ndarray:
    common.check_labels(
        seg, ALLOWED_LABELS, seg_path,
        "FeTS2022 coding: 1 necrosis, 2 oedema, 4 enhancing tumour; BraTS 2023 data codes enhancing tumour as 3",
    )
    return np.isin(seg, list(target_labels))


def find_cases(site: str, data_dir: Path, subjects: list[str], csv_path: Path, recipe: layout.VolumeRecipe) -> common.SiteSource:
    cases, problems = [], []
    for sid in subjects:
        folder = data_dir / sid
        if not folder.is_dir():
            problems.append(common.Problem(folder, f"subject folder is missing; {csv_path.name} lists it for {site}"))
            continue
        image, seg = _nifti(folder, f"{sid}_{MODALITY}"), _nifti(folder, f"{sid}_seg")
        if image is None or seg is None:
            missing = folder / f"{sid}_{MODALITY if image is None else 'seg'}.nii.gz"
            problems.append(common.Problem(missing, "file is missing; expected the subject's T1ce image and segmentation"))
            continue
        cases.append(layout.volume_case(sid, image, (seg,), sid, recipe))
    return common.SiteSource(site, data_dir, cases, problems, extra_files={"partition CSV": csv_path})


def prepare_fets(
    raw: Path,
    out: Path,
    *,
    image_size: int = 1024,
    mask_size: int = 256,
    overwrite: bool = False,
    sites=None,
    low_pct: float = 1.0,
    high_pct: float = 99.0,
    partition_csv=None,
    clients=None,
    two_and_half_d: bool = False,
    empty_slices_keep="all",
    skip_end_slices: bool = False,
    target_labels=None,
    skip_bad_cases: bool = False,
    mask_resize: str = common.DEFAULT_MASK_RESIZE,
    preset: str = presets.PROJECT,
    resize: str = PAD,
) -> list[Path]:
    """Prepare one site per FeTS client (``out/client<ID>``).

    ``target_labels``: the segmentation labels that form the one class — ``[4]`` enhancing tumour (default),
    ``[1, 4]`` tumour core (the paper code). ``two_and_half_d``: the reference code's 2.5D input — slices k-1, k,
    k+1 as the three channels instead of slice k copied three times. ``empty_slices_keep``: slices without target
    kept per volume — 'all' (default), an integer count, a fraction in [0, 1] written with a decimal point, or
    'every:N' (index a multiple of N). ``skip_end_slices``: never keep the first and last slice. ``mask_resize``: the
    masks' nearest-neighbour rule (``"nearest-exact"``, or ``"nearest"`` = OpenCV's INTER_NEAREST).
    ``preset='reference'`` requires the paper code's values for all of these (:mod:`~fedfms.data.preparers.presets`)."""
    raw, out = Path(raw), Path(out)
    vol.check_percentiles(low_pct, high_pct)
    empty_keep = vol.parse_empty_keep(empty_slices_keep)
    labels = parse_target_labels(target_labels)
    options = {
        "preset": presets.check_name(preset),
        "target_labels": labels,
        "low_pct": float(low_pct),
        "high_pct": float(high_pct),
        "empty_slices_keep": "all" if empty_keep is None else empty_keep,
        "two_and_half_d": bool(two_and_half_d),
        "skip_end_slices": bool(skip_end_slices),
        "mask_resize": common.check_mask_resize(mask_resize),
    }
    presets.check(DATASET, preset, {**options, "resize": check_resize(resize)})
    client_ids = parse_clients(clients)
    data_dir = find_data_dir(raw)
    csv_path = find_partition_csv(raw, data_dir, partition_csv)
    partitions = read_partitions(csv_path)
    absent = [c for c in client_ids if c not in partitions]
    if absent:
        raise DataError(f"{csv_path}: partition(s) {absent} not found; expected ids among {sorted(partitions)}")
    names = {site_name(c): c for c in client_ids}
    chosen = common.select_sites(
        [s if not str(s).strip().isdigit() else site_name(int(s)) for s in sites] if sites else None, list(names), DATASET
    )
    settings = {
        "modality": MODALITY,
        "partition_csv": csv_path.name,
        **options,
        "label_map": _label_map(labels),
    }
    recipe = layout.VolumeRecipe((class_name(labels),), partial(to_target, target_labels=tuple(labels)),
                                 low_pct=float(low_pct), high_pct=float(high_pct), empty_keep=empty_keep,
                                 two_and_half_d=bool(two_and_half_d), skip_end_slices=bool(skip_end_slices))
    return common.write_sites(
        ((find_cases(site, data_dir, partitions[names[site]], csv_path, recipe), {**settings, "partition_id": names[site]})
         for site in chosen),
        out=out, dataset=DATASET, classes=[class_name(labels)], image_size=image_size, mask_size=mask_size,
        overwrite=overwrite, skip_bad_cases=skip_bad_cases, resize=resize,
    )
