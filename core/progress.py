"""The one progress helper: a tqdm bar on a terminal; elsewhere (``nohup``, a batch scheduler,
``| tee``, where long quantization jobs run) a log line at a steady interval saying how many items
are done of how many, the time so far and the time left. ``COMPQUANT_NO_PROGRESS`` silences both;
``COMPQUANT_PROGRESS_SECONDS`` sets the interval of the log lines (default 30 s)."""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("compquant.progress")

INTERVAL_ENV = "COMPQUANT_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def progress(items: Iterable[T], *, desc: str, total: int | None = None, initial: int = 0,
             status: Callable[[], str] | None = None) -> Iterator[T]:
    """``items``, reporting progress as it goes; ``initial`` items were done before (a resumed run).
    ``status``, called after each item, adds a word on how it went (a learner's loss) to the bar or line."""
    if os.environ.get("COMPQUANT_NO_PROGRESS"):
        yield from items
    elif sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(items, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True)
        for item in bar:
            yield item
            if status is not None:
                bar.set_postfix_str(status())
    else:
        yield from _logged(items, desc, total, initial, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)), status)


def _logged(items: Iterable[T], desc: str, total: int | None, initial: int, interval: float,
            status: Callable[[], str] | None = None) -> Iterator[T]:
    """Log ``desc: k of n done, elapsed, about t left`` (and ``; status``) once ``interval`` seconds
    have passed since the last line, and when the last item is done."""
    started = last = time.monotonic()
    done = initial
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval or done == total:
            last = now
            line = progress_line(done, total, initial, now - started)
            log.info("%s: %s", desc, line if status is None else f"{line}; {status()}")


def progress_line(done: int, total: int | None, initial: int, elapsed: float) -> str:
    """``7 of 30 done, 1m05s elapsed, about 3m34s left`` (the rate from this run's items only)."""
    if total is None:
        return f"{done} done, {_duration(elapsed)} elapsed"
    line = f"{done} of {total} done, {_duration(elapsed)} elapsed"
    if done < total and done > initial:
        line += f", about {_duration(elapsed / (done - initial) * (total - done))} left"
    return line


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
