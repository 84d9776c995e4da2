"""WikiText-2, the corpus of the papers' perplexity protocol: the raw test split for evaluation, the
validation split for calibration, read from the local data folder laid out as the project's shared
one, or else through the `datasets` hub loader::

    wikitext-2-raw/wiki.test.raw      raw test split         (evaluation)
    wikitext-2/wiki.valid.tokens      tokenized validation   (calibration)
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.dataset import DATA_DIR_ENV, Purpose, TextDataset
from ..core.errors import DataNotFoundError
from ..core.files import binary_problem, read_text
from ..core.plugin_manager import hookimpl

def raw_rows(path: Path) -> str:
    """WikiText raw file → the hub's rows joined by blank lines (blank lines become empty rows)."""
    rows = [line if line.strip() else "" for line in read_text(path, "WikiText-2's test split").splitlines(keepends=True)]
    return "\n\n".join(rows)


_WIKITEXT_JOINERS = re.compile(r" @([-,.])@ ")


def tokenized_rows(path: Path) -> str:
    """WikiText tokenized file → plain-ish text: `<unk>` becomes `unk`, ` @-@ ` becomes `-`."""
    text = read_text(path, "WikiText-2's validation split").replace("<unk>", "unk")
    return _WIKITEXT_JOINERS.sub(r"\1", text)


@dataclass(frozen=True)
class Split:
    local: str
    read: Callable[[Path], str]
    hub: tuple[str, str, str]
    """(path, name, split) for `datasets.load_dataset`."""


class WikiText2(TextDataset):
    splits: dict[Purpose, Split] = {
        "evaluation": Split("wikitext-2-raw/wiki.test.raw", raw_rows, ("wikitext", "wikitext-2-raw-v1", "test")),
        "calibration": Split("wikitext-2/wiki.valid.tokens", tokenized_rows,
                             ("wikitext", "wikitext-2-raw-v1", "validation")),
    }

    def problem(self, purpose: Purpose, data_dir: Path | None) -> str | None:
        split = self.splits[purpose]
        if data_dir is not None and (data_dir / split.local).is_file():
            return binary_problem(data_dir / split.local)
        if importlib.util.find_spec("datasets") is None:
            return f"{self._where(split, data_dir)}, and the `datasets` hub loader is not installed. {self._fix(split)}"
        return None  # the hub may have it; whether it does is known only online

    def text(self, purpose: Purpose, data_dir: Path | None) -> str:
        split = self.splits[purpose]
        if data_dir is not None and (data_dir / split.local).is_file():
            return split.read(data_dir / split.local)
        try:
            from datasets import load_dataset

            path, config, name = split.hub
            return "\n\n".join(load_dataset(path, config, split=name)["text"])
        except Exception as error:  # ImportError offline without `datasets`, or the hub's own errors
            raise DataNotFoundError(
                f"wikitext2 ({purpose}) not found: {self._where(split, data_dir)}, and the hub loader failed "
                f"({type(error).__name__}: {error}). {self._fix(split)}"
            ) from None

    @staticmethod
    def _where(split: Split, data_dir: Path | None) -> str:
        return f"{data_dir / split.local} does not exist" if data_dir is not None else "no data folder is set"

    @staticmethod
    def _fix(split: Split) -> str:
        return (f"Put the file at <data folder>/{split.local} and pass --data-dir <data folder> "
                f"or set {DATA_DIR_ENV}=<data folder>.")


@hookimpl
def compquant_register_datasets(register) -> None:
    register("wikitext2", WikiText2())
