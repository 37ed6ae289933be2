"""The one progress bar of every loop a person waits for (prepare, predict, centralized, LOSO, pretrain).

tqdm on stderr, drawn only when stderr is a terminal: in a log file, a CI run or a test the bar is silent and the
caller's own lines (if any) say how far it got. Lines printed while a bar is drawn go through :func:`say` so they
appear above the bar instead of cutting through it."""

from __future__ import annotations

import sys
from typing import Iterable

from tqdm.auto import tqdm


def bar(iterable: Iterable | None = None, *, desc: str, unit: str, total: int | None = None, leave: bool = False,
        enabled: bool | None = None) -> tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand with ``total``). ``enabled``: None draws it only on a
    terminal; True / False force it."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave, file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled is None else not enabled)


def drawn(progress: tqdm) -> bool:
    """Whether ``progress`` is shown (a terminal, or forced on)."""
    return not progress.disable


def say(progress: tqdm | None, message: str, file=None) -> None:
    """Print ``message`` as a line of its own; above the bar while ``progress`` is drawn."""
    if progress is not None and drawn(progress):
        progress.write(message, file=file or sys.stdout)
    else:
        print(message, file=file or sys.stdout, flush=True)
