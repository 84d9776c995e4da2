"""Datasets by name, read from a local data folder or, failing that, the `datasets` hub loader.

The local folder comes from the ``data_dir`` argument (``--data-dir``) or the environment variable
``COMPQUANT_DATA_DIR``, laid out as the project's shared data folder is::

    wikitext-2-raw/wiki.test.raw      WikiText-2 raw test split    (evaluation)
    wikitext-2/wiki.valid.tokens      WikiText-2 validation split  (calibration)

Calibration never reads a test split: the splits are fixed per purpose here, not chosen by callers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from ..core.errors import DataNotFoundError

Purpose = Literal["evaluation", "calibration"]
ENV_VAR = "COMPQUANT_DATA_DIR"


def _raw_rows(path: Path) -> str:
    """WikiText raw file → the hub's rows joined by blank lines (blank lines become empty rows)."""
    rows = [line if line.strip() else "" for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]
    return "\n\n".join(rows)


_WIKITEXT_JOINERS = re.compile(r" @([-,.])@ ")


def _tokenized_rows(path: Path) -> str:
    """WikiText tokenized file → plain-ish text: `<unk>` becomes `unk`, ` @-@ ` becomes `-`."""
    text = path.read_text(encoding="utf-8").replace("<unk>", "unk")
    return _WIKITEXT_JOINERS.sub(r"\1", text)


@dataclass(frozen=True)
class Source:
    local: str
    read: Callable[[Path], str]
    hub: tuple[str, str, str]
    """(path, name, split) for `datasets.load_dataset`."""


DATASETS: dict[str, dict[Purpose, Source]] = {
    "wikitext2": {
        "evaluation": Source("wikitext-2-raw/wiki.test.raw", _raw_rows, ("wikitext", "wikitext-2-raw-v1", "test")),
        "calibration": Source(
            "wikitext-2/wiki.valid.tokens", _tokenized_rows, ("wikitext", "wikitext-2-raw-v1", "validation")
        ),
    },
}


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The local data folder: the argument, else $COMPQUANT_DATA_DIR, else None."""
    chosen = explicit if explicit is not None else os.environ.get(ENV_VAR)
    return Path(chosen).expanduser() if chosen else None


def load_text(name: str, purpose: Purpose, *, data_dir_: str | Path | None = None) -> str:
    """The text of dataset ``name`` for ``purpose``, from the local folder or the hub."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    source = DATASETS[name][purpose]
    folder = data_dir(data_dir_)
    if folder is not None and (folder / source.local).is_file():
        return source.read(folder / source.local)
    where = f"{folder / source.local} does not exist" if folder is not None else "no data folder is set"
    try:
        return _from_hub(source)
    except Exception as error:  # ImportError offline without `datasets`, or the hub's own errors
        raise DataNotFoundError(
            f"{name} ({purpose}) not found: {where}, and the hub loader failed ({type(error).__name__}: {error}). "
            f"Put the file at <data folder>/{source.local} and pass --data-dir <data folder> "
            f"or set {ENV_VAR}=<data folder>."
        ) from None


def _from_hub(source: Source) -> str:
    from datasets import load_dataset  # optional: only needed without a local copy

    path, config, split = source.hub
    rows = load_dataset(path, config, split=split)["text"]
    return "\n\n".join(rows)


def evaluation_tokens(tokenizer: Any, name: str, *, data_dir: str | Path | None = None) -> Tensor:
    """The whole evaluation split of ``name`` as one row of token ids (1, L)."""
    return tokenizer(load_text(name, "evaluation", data_dir_=data_dir), return_tensors="pt").input_ids


def calibration_windows(
    tokenizer: Any, name: str, *, nsamples: int, seqlen: int, seed: int, data_dir: str | Path | None = None
) -> Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the calibration split, (nsamples, seqlen)."""
    ids = tokenizer(load_text(name, "calibration", data_dir_=data_dir), return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise ValueError(f"{name} calibration text has {ids.numel()} tokens, too few for windows of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[start : start + seqlen] for start in starts.tolist()])
