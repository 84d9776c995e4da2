"""One run per output: an exclusive lock on a folder compquant writes (an output, a resume folder).

Two runs writing one output would mix their blocks in the resume checkpoint and race for the final
rename, so every run holds a lock on what it writes for as long as it runs. The lock is a small file
beside the folder (``.NAME.compquant-lock``) holding the owner's process id, host and start time,
locked with ``flock``: the kernel releases it when the owner dies, however it dies (SIGKILL
included), so a lock file left by a dead run is recognised as stale and taken over, with a log
line, instead of blocking the output forever. A second run while the owner lives is refused at
once, naming the owner's process id.

The lock is re-entrant within a process: the CLI holds the output's lock for the whole run, and
`compquant.save_quantized` (which takes it too, for Python callers) then finds it already held.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputPathError

log = logging.getLogger(__name__)

#: Locks this process holds: lock file path -> (open descriptor, how many holders).
_held: dict[Path, list[int]] = {}


class OutputLockedError(OutputPathError):
    """Another live run holds the lock on the folder."""


def lock_file(folder: str | Path) -> Path:
    """The lock file of ``folder``, beside it (the folder itself may not exist yet)."""
    folder = Path(folder).expanduser().resolve()
    return folder.parent / f".{folder.name}.compquant-lock"


@contextmanager
def exclusive(folder: str | Path) -> Iterator[Path]:
    """Hold the lock on ``folder`` while the block runs; refuse with `OutputLockedError` (naming
    the holder's process id) when another live process holds it."""
    path = lock_file(folder)
    if path in _held:
        _held[path][1] += 1
        try:
            yield path
        finally:
            _held[path][1] -= 1
        return
    descriptor = _acquire(path, Path(folder))
    _held[path] = [descriptor, 1]
    try:
        yield path
    finally:
        del _held[path]
        path.unlink(missing_ok=True)  # still ours: unlinked before the descriptor (and the flock) go
        os.close(descriptor)


def _acquire(path: Path, folder: Path) -> int:
    """Open and flock ``path``, retrying when the file was replaced between the open and the lock
    (its owner removed it on release), and write this process's record into it."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise OutputLockedError(
                f"{folder} is being written by another compquant run ({_describe(_read(path))}); wait for it to "
                "finish or stop it, or choose another --output"
            ) from None
        try:
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous owner unlinked it after we opened it: lock the new file instead
            os.close(descriptor)
            continue
        previous = _read(path)
        if previous:
            log.warning("taking over the lock on %s left by a run that is no longer running (%s)", folder,
                        _describe(previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(record).encode(), 0)
        return descriptor


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(record: dict) -> str:
    if not record:
        return "process unknown"
    return f"process {record.get('pid')} on {record.get('host')}, started {record.get('started')}"
