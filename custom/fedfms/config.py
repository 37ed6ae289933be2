"""Building configuration dataclasses from JSON-like dicts, refusing unknown fields (typos must not pass)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Mapping, TypeVar

from fedfms.errors import ConfigError

T = TypeVar("T")


def from_mapping(cls: type[T], data: Mapping, where: str) -> T:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    return cls(**data)


def parse_json_object(text: str | None, option: str) -> dict | None:
    """A command-line JSON object such as ``--train '{"lr": 1e-4}'``; one-line ConfigError otherwise."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option}: not valid JSON ({exc}); expected an object like '{{\"lr\": 1e-4}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option}: {text!r} is not a JSON object; expected an object like '{{\"lr\": 1e-4}}'")
    return value


def positive_int_arg(text: str) -> int:
    """argparse ``type=`` for options that take a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def missing_folders(path: str | Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first (what to remove again if a write fails)."""
    path = Path(path)
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing
