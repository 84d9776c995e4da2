"""Where the calibration loop gets each block from and puts it back.

`ResidentBlocks` is the usual case: the whole model is in memory and each block visits the compute
device while it is quantized. `StreamedBlocks` is the low-memory mode: the model is a skeleton
whose blocks hold no weights; each block is read from the safetensors shards just before it is
quantized, handed to a callback (which writes its export) when done, and emptied again, so memory
holds one block at a time.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .errors import ModelLoadError
from .qlinear import QuantizedLinear


class ResidentBlocks:
    """Blocks already in memory: moved to ``device`` to be quantized and back home afterwards."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.home: torch.device | None = None

    def prepare_outside(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        self.home = next(blocks[0].parameters()).device

    def release_outside(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        pass

    def load(self, prefix: str, block: nn.Module) -> None:
        block.to(self.device)

    def release(self, prefix: str, block: nn.Module, records: dict[str, QuantizedLinear]) -> dict[str, QuantizedLinear]:
        """Put the block back; return the records to keep (all of them: the export comes later)."""
        block.to(self.home)
        return records

    @contextlib.contextmanager
    def borrow(self, prefix: str, block: nn.Module) -> Iterator[None]:
        """A later block on the device while a learner looks ahead through it, then back home."""
        block.to(self.device)
        try:
            yield
        finally:
            block.to(self.home)


class SafetensorsWeights:
    """The tensors of a model folder's safetensors files (one file, or shards with an index),
    read one at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", framework="pt") as handle:
                self.files = {name: self.folder / "model.safetensors" for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{self.folder} holds no model.safetensors or model.safetensors.index.json; "
                                    "low-memory mode reads safetensors checkpoints only")

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> Tensor:
        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)


def materialize(module: nn.Module, prefix: str, weights: SafetensorsWeights, device: torch.device, dtype: torch.dtype,
                skip: Callable[[str], bool] = lambda name: False) -> None:
    """Give every empty (meta) parameter of ``module`` its tensor from ``weights``."""
    from accelerate.utils import set_module_tensor_to_device

    for name, parameter in list(module.named_parameters()):
        full = f"{prefix}{name}"
        if parameter.is_meta and not skip(full) and full in weights.files:
            set_module_tensor_to_device(module, name, device, value=weights.get(full), dtype=dtype)


def empty(module: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> None:
    """Drop the parameters' storage: they become meta tensors of the same shape."""
    from accelerate.utils import set_module_tensor_to_device

    for name, parameter in list(module.named_parameters()):
        if not parameter.is_meta and not skip(name):
            set_module_tensor_to_device(module, name, "meta")


class StreamedBlocks:
    """Blocks read from ``weights`` just in time and emptied once ``finished`` has their export."""

    def __init__(
        self,
        weights: SafetensorsWeights,
        device: torch.device,
        dtype: torch.dtype,
        finished: Callable[[str, nn.Module, dict[str, QuantizedLinear]], None],
    ) -> None:
        self.weights, self.device, self.dtype, self.finished = weights, device, dtype, finished
        self.block_prefix = ""

    def prepare_outside(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Load what runs before the first block (embeddings), never the blocks themselves."""
        self.block_prefix = next(name for name, module in model.named_modules() if module is blocks) + "."
        materialize(model, "", self.weights, self.device, self.dtype, skip=self._in_blocks)

    def release_outside(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """The first block's inputs are caught: nothing outside the blocks is needed any more."""
        empty(model, skip=self._in_blocks)

    def _in_blocks(self, name: str) -> bool:
        return name.startswith(self.block_prefix)

    def load(self, prefix: str, block: nn.Module) -> None:
        materialize(block, f"{prefix}.", self.weights, self.device, self.dtype)
        missing = [f"{prefix}.{name}" for name, parameter in block.named_parameters() if parameter.is_meta]
        if missing:
            raise ModelLoadError(
                f"{self.weights.folder} holds no tensor named {missing[0]} ({len(missing)} of {prefix}'s tensors are "
                "missing): the checkpoint names them otherwise than the model does (transformers renames some on "
                "load, e.g. Mixtral's block_sparse_moe to mlp), so low-memory mode cannot stream them; drop --low-memory"
            )

    def release(self, prefix: str, block: nn.Module, records: dict[str, QuantizedLinear]) -> dict[str, QuantizedLinear]:
        """Export the block, empty it, and return its records without their codes (on disk now;
        a record's grid settings and shapes are all the export still needs)."""
        self.finished(prefix, block, records)
        empty(block)
        return {name: replace(record, codes=record.codes[:0]) for name, record in records.items()}

    @contextlib.contextmanager
    def borrow(self, prefix: str, block: nn.Module) -> Iterator[None]:
        """A later block read in full precision while a learner looks ahead through it, then emptied
        again (it is read once more when its own turn comes)."""
        self.load(prefix, block)
        try:
            yield
        finally:
            empty(block)
