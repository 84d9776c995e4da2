"""The one progress-bar helper: tqdm on a terminal, silent otherwise or when COMPQUANT_NO_PROGRESS is set."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, total: int | None = None, initial: int = 0) -> Iterator[T]:
    from tqdm.auto import tqdm

    disable = True if os.environ.get("COMPQUANT_NO_PROGRESS") else None  # None: only on a terminal
    yield from tqdm(items, desc=desc, total=total, initial=initial, disable=disable, leave=False, dynamic_ncols=True)
