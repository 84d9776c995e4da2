"""What a dataset is: a named source of calibration or evaluation data, text or images, registered
by a plugin (`compquant_register_datasets`). The built-in WikiText-2 is one; an in-house corpus is
another, added from its own package.

A dataset only says where its data is and reads it; drawing calibration windows, tokenizing and
preprocessing images for a model are the same for every dataset and live in `compquant.evaluation`.
Calibration never reads an evaluation split: a dataset is asked for one purpose at a time.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from PIL.Image import Image

Purpose = Literal["calibration", "evaluation"]
Modality = Literal["text", "images"]
DATA_DIR_ENV = "COMPQUANT_DATA_DIR"


def resolve_data_dir(explicit: str | Path | None = None) -> Path | None:
    """The local data folder: ``explicit`` (``--data-dir``), else $COMPQUANT_DATA_DIR, else None."""
    chosen = explicit if explicit is not None else os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


class Dataset(ABC):
    """A named corpus. ``data_dir`` is the user's local data folder (``--data-dir`` or
    ``$COMPQUANT_DATA_DIR``), or None when none is set."""

    modality: ClassVar[Modality]
    #: What the dataset can be used for.
    purposes: ClassVar[tuple[Purpose, ...]] = ("calibration", "evaluation")

    def problem(self, purpose: Purpose, data_dir: Path | None) -> str | None:
        """Why the data for ``purpose`` cannot be read, with the fix; None when it can. Called
        before any model is loaded, so a missing file costs seconds, not a run. The default says
        only whether the purpose is offered."""
        if purpose not in self.purposes:
            return f"it offers no {purpose} data (only {', '.join(self.purposes)})"
        return None


class TextDataset(Dataset):
    """Plain text, tokenized by the model's tokenizer."""

    modality = "text"

    @abstractmethod
    def text(self, purpose: Purpose, data_dir: Path | None) -> str:
        """The whole text of the split for ``purpose``."""


class ImageDataset(Dataset):
    """Labelled images, preprocessed by the model's own evaluation transform."""

    modality = "images"

    @abstractmethod
    def images(self, purpose: Purpose, data_dir: Path | None) -> Sequence[tuple[Image, int]]:
        """(image, class index) pairs of the split for ``purpose``; indexing may load lazily."""
