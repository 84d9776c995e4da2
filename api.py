"""The user-facing entry points that draw on more than the core: `quantize` and
`quantize_low_memory` draw their calibration inputs from the configured dataset when the caller
passes none (token windows through a tokenizer, or images for a vision model)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pluggy
from torch import Tensor, nn

from .core import low_memory, pipeline
from .core.block_store import SafetensorsWeights, StreamedBlocks
from .core.config import QuantConfig
from .core.plugin_manager import registry_for
from .core.report import QuantReport
from .evaluation.datasets import calibration_inputs


def calibration_for(
    model: nn.Module,
    config: QuantConfig,
    calibration: Tensor | Sequence[Tensor] | None,
    tokenizer: Any | None,
    plugin_manager: pluggy.PluginManager | None = None,
) -> Tensor | Sequence[Tensor] | None:
    """``calibration`` as given, or drawn from ``config.calibration`` when the run needs some."""
    if calibration is None and pipeline.needs_calibration(config, registry_for(plugin_manager)):
        return calibration_inputs(model, config, tokenizer, plugin_manager)
    return calibration


def quantize(
    model: nn.Module,
    config: QuantConfig,
    *,
    calibration: Tensor | Sequence[Tensor] | None = None,
    tokenizer: Any | None = None,
    plugin_manager: pluggy.PluginManager | None = None,
    resume_dir: str | Path | None = None,
    block_store: StreamedBlocks | None = None,
) -> QuantReport:
    """Apply ``config.transforms`` and quantize ``model`` in place with ``config.solver``.

    ``calibration`` is a (samples, ...) tensor of model inputs or a sequence of ready batches;
    without it, language-model windows are drawn from ``config.calibration.dataset`` with
    ``tokenizer`` (vision models: images from the image folder or dataset it names). The rest is
    `compquant.core.pipeline.quantize`.
    """
    calibration = calibration_for(model, config, calibration, tokenizer, plugin_manager)
    return pipeline.quantize(model, config, calibration=calibration, plugin_manager=plugin_manager,
                             resume_dir=resume_dir, block_store=block_store)


def quantize_low_memory(
    model: nn.Module,
    weights: SafetensorsWeights,
    config: QuantConfig,
    output: str | Path,
    *,
    tokenizer: Any | None = None,
    calibration: Tensor | Sequence[Tensor] | None = None,
    plugin_manager: pluggy.PluginManager | None = None,
    **export: Any,
) -> QuantReport:
    """`compquant.core.low_memory.quantize_low_memory`, with calibration drawn as `quantize` does;
    ``export`` takes ``format``, ``dtype``, ``max_shard_size`` and ``overwrite``."""
    calibration = calibration_for(model, config, calibration, tokenizer, plugin_manager)
    return low_memory.quantize_low_memory(model, weights, config, output, tokenizer=tokenizer, calibration=calibration,
                                          plugin_manager=plugin_manager, **export)


__all__ = ["calibration_for", "quantize", "quantize_low_memory"]
