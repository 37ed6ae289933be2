"""Building configuration dataclasses from JSON-like dicts, refusing unknown fields (typos must not pass)."""

from __future__ import annotations

from dataclasses import fields
from typing import Mapping, TypeVar

from fedfms.errors import ConfigError

T = TypeVar("T")


def from_mapping(cls: type[T], data: Mapping, where: str) -> T:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    return cls(**data)
