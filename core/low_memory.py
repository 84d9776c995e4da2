"""Low-memory mode: quantize a model larger than memory, one block at a time.

The model is a skeleton whose parameters hold no storage. Each block is read from the source
folder's safetensors shards just before it is quantized, written to the output's shards in the
export format as soon as it is done, and emptied again; the embeddings are loaded only to catch the
first block's inputs, and every other tensor outside the blocks is copied from the source shards
to the output one at a time. Peak memory is about one block, its solve, and the calibration
activations of one block's input, whatever the depth of the model.

Transforms (which rewrite every block together) and resuming are not available in this mode. On
several ranks every rank reads each block from the shards itself, and rank 0 alone writes.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import Tensor, nn

from .block_store import SafetensorsWeights, StreamedBlocks
from .config import QuantConfig
from .distributed import Ranks
from .finite import check_input_weights
from .exporters import ExportError, Exporter, ExportJob, ShardWriter, choose_exporter, write_config
from .pipeline import quantize, resolve_device
from .plugin_manager import registry_for
from .qlinear import QuantizedLinear
from .registry import PluginRegistry
from .report import QuantReport
from .saving import check_output, staged_output, write_metadata

log = logging.getLogger(__name__)


def quantize_low_memory(
    model: nn.Module,
    weights: SafetensorsWeights,
    config: QuantConfig,
    output: str | Path,
    *,
    tokenizer: Any | None = None,
    calibration: Tensor | Sequence[Tensor] | None = None,
    format: str = "auto",
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    plugin_manager: pluggy.PluginManager | None = None,
) -> QuantReport:
    """Quantize the skeleton ``model`` whose tensors lie in ``weights`` with ``calibration`` and
    write it to ``output`` in ``format``, block by block (see the module docstring); ``tokenizer``
    is saved beside it. Returns the report."""
    if config.transforms:
        raise ValueError(f"transforms {config.transforms} rewrite every block at once, which low-memory mode cannot "
                         "do; drop --low-memory (the model must then fit in memory) or the transforms")
    if not Ranks.current().main:  # every rank reads its blocks from the shards; rank 0 alone writes them
        store = StreamedBlocks(weights, resolve_device(config.device), next(model.parameters()).dtype,
                               lambda prefix, block, records: None)
        return quantize(model, config, calibration=calibration, plugin_manager=plugin_manager, block_store=store)
    output = check_output(output, weights.folder, overwrite=overwrite,
                          needed_bytes=int(sum(f.stat().st_size for f in set(weights.files.values())) * 1.1))
    check_input_weights(((name, weights.get(name)) for name in weights.names()), str(weights.folder))
    compute_dtype = next(model.parameters()).dtype
    with staged_output(output, overwrite=overwrite) as staging:
        export = _BlockExport(model, format, dtype or compute_dtype, ShardWriter(staging, max_shard_size),
                              registry_for(plugin_manager))
        store = StreamedBlocks(weights, resolve_device(config.device), compute_dtype, export.block)
        report = quantize(model, config, calibration=calibration, plugin_manager=plugin_manager, block_store=store)
        for name in weights.names():  # everything outside the blocks, one tensor at a time
            if not name.startswith(store.block_prefix):
                export.writer.add(export.exporter.convert({name: weights.get(name)}, {}, export.dtype))
                export.writer.flush()
        export.writer.finish()
        write_config(model, staging, export.dtype)
        export.exporter.annotate(staging, report.records)
        summary = {"format": export.exporter.name, "dtype": str(export.dtype).removeprefix("torch."), "low_memory": "true"}
        write_metadata(staging, tokenizer, config, report, summary, online={})
    log.info("saved the %s export of %s to %s, one block at a time", export.exporter.name, weights.folder, output)
    return report


class _BlockExport:
    """Writes each finished block in the export format. The format is chosen on the first block's
    records (``auto`` needs them); every later block is checked against it."""

    def __init__(self, model: nn.Module, format: str, dtype: torch.dtype, writer: ShardWriter,
                 registry: PluginRegistry) -> None:
        self.model, self.format, self.dtype, self.writer, self.registry = model, format, dtype, writer, registry
        self.exporter: Exporter | None = None

    def block(self, prefix: str, block: nn.Module, records: dict[str, QuantizedLinear]) -> None:
        job = ExportJob(self.model, records, dtype=self.dtype)
        if self.exporter is None:
            self.exporter = choose_exporter(self.format, job, self.registry)
        elif (problem := self.exporter.unsupported(job)) is not None:
            raise ExportError(f"format {self.exporter.name!r}, chosen on the first block, cannot express {prefix}: "
                              f"{problem}")
        state = {f"{prefix}.{name}": tensor.cpu() for name, tensor in block.state_dict().items()}
        self.writer.add(self.exporter.convert(state, records, self.dtype))
        self.writer.flush()  # on disk now: memory never holds more than this block's export
