"""The one progress bar of every loop a person waits for (prepare, predict, centralized, LOSO, pretrain).

tqdm on stderr, drawn only when stderr is a terminal: in a log file, a CI run or a test the bar is silent and the
caller's own lines say how far it got. Lines written while a bar is drawn go through :func:`lines_above`, so they
appear above the bar instead of cutting through it."""

from __future__ import annotations

import sys
from typing import Callable, Iterable

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


def lines_above(progress: tqdm, log: Callable[[str], None]) -> Callable[[str], None]:
    """``log``, made to print above ``progress`` while the bar is drawn (the bar is cleared and redrawn around it)."""
    if not drawn(progress):
        return log

    def say(message: str) -> None:
        with progress.external_write_mode():
            log(message)

    return say
