"""Calibration and evaluation inputs from registered datasets (`compquant.core.dataset`): the text
of a split tokenized, random calibration windows, and images for vision models.

A dataset is named by what a plugin registered (the built-in ``wikitext2``, or any other); an image
calibration set may also be given as a folder path (one sub-folder per class). The local data
folder is ``--data-dir`` or ``$COMPQUANT_DATA_DIR`` (docs/data.md).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import Tensor, nn

from ..core.config import QuantConfig
from ..core.dataset import DATA_DIR_ENV, Dataset, Modality, Purpose, TextDataset, resolve_data_dir
from ..core.errors import DataNotFoundError
from ..core.plugin_manager import registry_for

log = logging.getLogger(__name__)


def dataset(name: str, modality: Modality, plugin_manager: pluggy.PluginManager | None = None) -> Dataset:
    """The registered dataset ``name``, which must hold ``modality``."""
    found = registry_for(plugin_manager).get("dataset", name)
    if found.modality != modality:
        raise ValueError(f"dataset {name!r} holds {found.modality}, but {modality} are needed here")
    return found


def check_dataset(name: str, purpose: Purpose, data_dir: str | Path | None = None,
                  plugin_manager: pluggy.PluginManager | None = None) -> None:
    """Fail now, before a model is loaded, when ``name`` is neither a registered dataset nor an
    image folder, or its ``purpose`` split cannot be read."""
    if Path(name).expanduser().is_dir():
        return
    folder = resolve_data_dir(data_dir)
    if folder is not None and not folder.is_dir():
        raise DataNotFoundError(f"the data folder {folder} does not exist (from --data-dir or ${DATA_DIR_ENV}); "
                                "give the folder that holds the datasets, laid out as docs/data.md describes")
    problem = registry_for(plugin_manager).get("dataset", name).problem(purpose, folder)
    if problem is not None:
        raise DataNotFoundError(f"dataset {name!r} ({purpose}): {problem}")


def load_text(name: str, purpose: Purpose, *, data_dir_: str | Path | None = None,
              plugin_manager: pluggy.PluginManager | None = None) -> str:
    """The text of dataset ``name`` for ``purpose``."""
    source: TextDataset = dataset(name, "text", plugin_manager)
    return source.text(purpose, resolve_data_dir(data_dir_))


def evaluation_tokens(tokenizer: Any, name: str, *, data_dir: str | Path | None = None,
                      plugin_manager: pluggy.PluginManager | None = None) -> Tensor:
    """The whole evaluation split of ``name`` as one row of token ids (1, L)."""
    text = load_text(name, "evaluation", data_dir_=data_dir, plugin_manager=plugin_manager)
    return tokenizer(text, return_tensors="pt").input_ids


def calibration_windows(
    tokenizer: Any, name: str, *, nsamples: int, seqlen: int, seed: int, data_dir: str | Path | None = None,
    plugin_manager: pluggy.PluginManager | None = None,
) -> Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the calibration split, (nsamples, seqlen)."""
    text = load_text(name, "calibration", data_dir_=data_dir, plugin_manager=plugin_manager)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise ValueError(f"{name} calibration text has {ids.numel()} tokens, too few for windows of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[start : start + seqlen] for start in starts.tolist()])


def warn_beyond_context(model: nn.Module, seqlen: int) -> None:
    """Warn when windows of ``seqlen`` tokens are longer than the model's context
    (``max_position_embeddings``): positions past it were never trained, so its statistics and
    scores there describe a model nobody runs."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:
        log.warning("windows of %d tokens are longer than the model's context of %d tokens "
                    "(max_position_embeddings); use --seqlen %d or less", seqlen, context, context)


def calibration_inputs(
    model: nn.Module, config: QuantConfig, tokenizer: Any | None, plugin_manager: pluggy.PluginManager | None = None
) -> Tensor:
    """The run's calibration inputs as ``config.calibration`` describes them: token windows for a
    language model (one with a tokenizer), preprocessed images for a vision model."""
    from .images import calibration_images

    cal = config.calibration
    if tokenizer is not None:
        warn_beyond_context(model, cal.seqlen)
        return calibration_windows(tokenizer, cal.dataset, nsamples=cal.nsamples, seqlen=cal.seqlen, seed=config.seed,
                                   data_dir=config.data_dir, plugin_manager=plugin_manager)
    registered = registry_for(plugin_manager).table("dataset").get(cal.dataset)
    if Path(cal.dataset).expanduser().is_dir() or (registered is not None and registered.obj.modality == "images"):
        return calibration_images(model, cal.dataset, nsamples=cal.nsamples, seed=config.seed, data_dir=config.data_dir,
                                  plugin_manager=plugin_manager)
    raise ValueError(
        f"solver {config.solver!r} needs calibration data: pass calibration=<inputs>, a tokenizer so that windows can "
        f"be drawn from {cal.dataset!r}, or (vision models) set calibration.dataset to an image folder or an image dataset"
    )
