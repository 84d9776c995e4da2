"""Reading and writing files with errors that name them.

Reading: `read_text` and `read_json` turn a binary file or malformed JSON into one message that
names the file, instead of a decoder's traceback.

Writing: `save_safetensors` makes a full disk an ordinary ``OSError``.

safetensors reports every I/O failure as its own ``SafetensorError`` with the operating system's
error only in the text ("I/O error: No space left on device (os error 28)"), so code that handles
a full disk (the staging folder's clean-up, the command line's message) would never see it. Every
safetensors file compquant writes goes through `save_safetensors`, which turns such an error back
into the ``OSError`` it was, with the file's name.
"""
from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from .errors import FileFormatError

_OS_ERROR = re.compile(r"os error (\d+)")


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, raising ``OSError`` (with ``errno`` and the file name) for
    an operating-system failure such as a full disk."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        found = _OS_ERROR.search(str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from error


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path`` (``what`` it is, for the message); a binary or undecodable file
    is a `FileFormatError` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise FileFormatError(f"{path} is not UTF-8 text (a binary file? byte {error.start} cannot be decoded); "
                              f"{what} must be a text file") from None


def binary_problem(path: str | Path, sample: int = 1 << 16) -> str | None:
    """Why ``path`` is not a text file, judged from its first ``sample`` bytes (a NUL byte, or bytes
    that are not UTF-8), or None: a cheap check before a long run reads the whole file."""
    with open(path, "rb") as handle:
        head = handle.read(sample)
    if b"\0" in head:
        return f"{path} is a binary file (it holds NUL bytes), not text; put the dataset's text file there"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as error:
        return f"{path} is not UTF-8 text (byte {error.start} cannot be decoded); put the dataset's text file there"
    return None


def read_json(path: str | Path, what: str = "it") -> Any:
    """The JSON in ``path``; malformed JSON is a `FileFormatError` naming the file and the place."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise FileFormatError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                              f"fix or replace {what}") from None
