"""What a preparation read, so that a re-run can tell whether its output is still exact.

``fedfms prepare`` records, per site, every raw file each case read, in the manifest under
``settings.source.inputs``::

    {"cases":    {"Case00": ["Case00.nii.gz", "Case00_segmentation.nii.gz"], ...},
     "problems": ["Case07.nii.gz"],                      # files found but not usable as a case (unpaired, ...)
     "files":    {"Case00.nii.gz": {"size": 123, "mtime_ns": 1700000000000000000, "sha256": "..."}, ...}}

File keys are paths relative to the site's raw folder, so a raw folder that was moved or copied still counts as
the same input; files read from elsewhere (a partition CSV, ``patients.csv``) are keyed ``@<role>``. A file is
unchanged when its size and modification time are equal; when only the time differs (a copy, a ``touch``) its
SHA-256 decides, for files up to :data:`HASH_LIMIT` (larger ones, such as PanNuke's multi-GB arrays, are taken
as changed: the same rule ``make`` uses).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_LIMIT = 64 << 20  # bytes; files up to this size get a content hash
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, within one process


def file_key(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.abspath(path)).as_posix()


def sha256(path: Path) -> str:
    st = path.stat()
    key = (str(Path(os.path.abspath(path))), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _entry(path: Path, with_hash: bool) -> dict:
    st = path.stat()
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_hash and st.st_size <= HASH_LIMIT:
        entry["sha256"] = sha256(path)
    return entry


def scan(source, with_hashes: bool) -> tuple[dict, dict[str, Path]]:
    """The input record of a :class:`~fedfms.data.preparers.common.SiteSource` and, per file key, the file."""
    root = Path(source.root)
    paths: dict[str, Path] = {}
    cases = {}
    for case in source.cases:
        keys = []
        for f in case.files or (case.path,):
            key = file_key(f, root)
            paths[key] = Path(f)
            keys.append(key)
        cases[case.id] = sorted(set(keys))
    problems = sorted({file_key(p.path, root) for p in source.problems})
    for role, f in sorted(source.extra_files.items()):
        paths[f"@{role}"] = Path(f)
    files = {key: _entry(path, with_hashes) for key, path in sorted(paths.items()) if path.is_file()}
    return {"cases": cases, "problems": problems, "extra": sorted(f"@{r}" for r in source.extra_files), "files": files}, paths


def _changed(old: dict | None, path: Path) -> bool:
    if not old or not path.is_file():
        return True
    st = path.stat()
    if st.st_size != old.get("size"):
        return True
    if st.st_mtime_ns == old.get("mtime_ns"):
        return False
    return "sha256" not in old or sha256(path) != old["sha256"]


def _names(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f", ... {len(items) - limit} more" if len(items) > limit else "")


def changes(recorded: dict, source) -> list[str]:
    """What differs between the inputs recorded in a manifest and what ``source`` finds now (empty: identical)."""
    now, paths = scan(source, with_hashes=False)
    old_cases, new_cases = recorded.get("cases", {}), now["cases"]
    old_files = recorded.get("files", {})
    added = sorted(set(new_cases) - set(old_cases))
    removed = sorted(set(old_cases) - set(new_cases))
    modified = sorted(
        c for c in set(new_cases) & set(old_cases)
        if new_cases[c] != sorted(old_cases[c]) or any(_changed(old_files.get(k), paths[k]) for k in new_cases[c])
    )
    out = []
    if added:
        out.append(f"{len(added)} case(s) added ({_names(added)})")
    if removed:
        out.append(f"{len(removed)} case(s) removed ({_names(removed)})")
    if modified:
        out.append(f"{len(modified)} case(s) changed ({_names(modified)})")
    old_problems, new_problems = set(recorded.get("problems", [])), set(now["problems"])
    if old_problems != new_problems:
        plus, minus = sorted(new_problems - old_problems), sorted(old_problems - new_problems)
        detail = "; ".join(filter(None, [f"new: {_names(plus)}" if plus else "", f"gone: {_names(minus)}" if minus else ""]))
        out.append(f"unusable files changed ({detail})")
    old_extra, new_extra = set(recorded.get("extra", [])), set(now["extra"])
    for key in sorted(old_extra | new_extra):
        role = key[1:]
        if key not in old_extra:
            out.append(f"{role} added")
        elif key not in new_extra:
            out.append(f"{role} removed")
        elif _changed(old_files.get(key), paths[key]):
            out.append(f"{role} changed")
    return out
