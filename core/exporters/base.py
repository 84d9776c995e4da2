"""What every exporter shares: the job it reads, its interface, and the checkpoint writer
(sharded safetensors with an index, written shard by shard, and config.json)."""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CompquantError
from ..files import save_safetensors
from ..finite import check_before_writing
from ..qlinear import LinearLayout, QuantizedLinear


class ExportError(CompquantError):
    """A model that the chosen format cannot express, or an unknown format."""


@dataclass(frozen=True)
class ExportJob:
    """A quantized model and what the exporters need to know about it. Before the work, a planned
    job has no records, only the ``planned`` layouts of the linears the run will quantize (and, in
    ``online_ops``, placeholders for the ops its transforms will attach)."""

    model: nn.Module
    records: dict[str, QuantizedLinear]
    online_ops: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    """Floating dtype of the written tensors (scales and unquantized weights); None keeps the model's."""
    max_shard_size: str | int = "5GB"
    planned: dict[str, LinearLayout] | None = None

    @property
    def layouts(self) -> dict[str, LinearLayout]:
        """Every quantized linear's layout, by path: planned, or read off the records."""
        if self.planned is not None:
            return self.planned
        return {name: record.layout for name, record in self.records.items()}

    @property
    def is_transformers_model(self) -> bool:
        return hasattr(self.model, "save_pretrained") and hasattr(self.model, "config")

    @property
    def float_dtype(self) -> torch.dtype:
        return self.dtype or next(self.model.parameters()).dtype


class Exporter(ABC):
    """Writes a quantized model in one format: `convert` turns named tensors into the format's
    (a whole model at once, or one block at a time in low-memory mode), `annotate` adds the
    format's section to config.json. A format that compquant should also read back implements
    `reads` and `load`, and `compquant.load_model` then loads its folders (so ``compquant eval``
    works on them)."""

    name: str
    """What ``--format`` takes; the name the exporter is registered under."""
    description: str
    #: Place in the ``auto`` choice: formats are tried by increasing rank; None is never chosen by auto.
    auto_rank: int | None = None

    def unsupported_layout(self, job: ExportJob) -> str | None:
        """Why this format cannot express ``job`` as far as its `ExportJob.layouts` (shapes, grids,
        column order) and online ops tell, with what to do instead; None when it can. Asked before
        the work, with a planned job, so that a format that cannot store the run costs seconds."""
        return None

    def unsupported(self, job: ExportJob) -> str | None:
        """Why this format cannot express the finished ``job``, with what to do instead; None when it
        can. By default what `unsupported_layout` says; a format that also depends on the numbers
        (GPTQ v1's zero points) adds that."""
        return self.unsupported_layout(job)

    @abstractmethod
    def convert_linear(self, record: QuantizedLinear, dtype: torch.dtype) -> dict[str, Tensor]:
        """The tensors that replace one quantized linear's ``weight``, by local name."""

    def annotate(self, folder: Path, records: dict[str, QuantizedLinear]) -> None:
        """Add the format's quantization section to ``folder/config.json``."""

    def write(self, job: ExportJob, folder: Path) -> None:
        """Write ``job`` into the empty ``folder``: a transformers checkpoint by default."""
        write_model(self, job, folder)

    def reads(self, config: dict[str, Any]) -> bool:
        """Whether a model folder with this ``config.json`` is in this format (and `load` reads it)."""
        return False

    def load(self, folder: Path, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
        """The model in ``folder`` as a plain transformers model with dense weights."""
        raise NotImplementedError(f"the {self.name} exporter does not read its checkpoints back")

    def convert(self, state: dict[str, Tensor], records: dict[str, QuantizedLinear], dtype: torch.dtype) -> dict[str, Tensor]:
        """``state`` in ``dtype`` with the weight of every linear in ``records`` replaced by the
        format's tensors."""
        converted = {name: _cast(tensor, dtype) for name, tensor in state.items()}
        for name, record in records.items():
            del converted[f"{name}.weight"]
            converted.update({f"{name}.{key}": value for key, value in self.convert_linear(record, dtype).items()})
        return converted


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()


def online_ops_problem(job: ExportJob, format_name: str) -> str | None:
    """The reason a plain checkpoint cannot hold a model with online operations."""
    if not job.online_ops:
        return None
    where = ", ".join(sorted(job.online_ops)[:3]) + (" ..." if len(job.online_ops) > 3 else "")
    return (
        f"the model has online operations (QuaRot's R4 or R3 Hadamards, at {where}) that a {format_name} "
        "checkpoint cannot express and its consumers would not run; export with --format fake (compquant.load_model "
        "re-attaches them), or quantize a fused-only variant without online rotations "
        "(transform_options: {quarot: {r4: false, r3: false}})"
    )


def unique_tensors(named: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """Each storage once: tied embeddings keep the first name, and transformers re-ties the other
    on load from the config."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in named:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            unique[name] = tensor
    return unique


def shard_size_bytes(size: str | int) -> int:
    """``"5GB"``, ``"500MB"`` or a number of bytes, as bytes; anything else is an `ExportError`."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        limit = TypeAdapter(ByteSize).validate_python(size)
    except ValidationError:
        limit = 0
    if limit <= 0:
        raise ExportError(f"--max-shard-size {size!r} is not a size; write it as e.g. 5GB, 500MB or a number of bytes")
    return int(limit)


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_size`` bytes as they come, so
    a model never has to be whole in memory; `finish` names the shards as transformers does and
    writes the index when there is more than one."""

    def __init__(self, folder: Path, max_shard_size: str | int) -> None:
        self.folder = folder
        self.limit = shard_size_bytes(max_shard_size)
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, Tensor]) -> None:
        check_before_writing(tensors.items(), "the quantized model")
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.limit:
                self._flush()
            self.pending[name] = tensor.contiguous()
            self.pending_bytes += size
            self.total_bytes += size

    def flush(self) -> None:
        """Write what is pending as a shard now (low-memory mode ends a shard with every block)."""
        if self.pending:
            self._flush()

    def _flush(self) -> None:
        save_safetensors(self.pending, self.folder / f"shard-{len(self.shards):05d}.partial", {"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for index, name in enumerate(names):
            (self.folder / f"shard-{index:05d}.partial").rename(self.folder / name)
        if count > 1:
            weight_map = {tensor: name for name, tensors in zip(names, self.shards) for tensor in tensors}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_config(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """config.json (with the written dtype) and generation_config.json of a transformers model."""
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def add_quantization_config(folder: Path, section: dict[str, Any]) -> None:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = section
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def write_model(exporter: Exporter, job: ExportJob, folder: Path) -> None:
    """The whole in-memory model, in ``exporter``'s format, into ``folder``."""
    writer = ShardWriter(folder, job.max_shard_size)
    writer.add(exporter.convert(unique_tensors(job.model.state_dict().items()), job.records, job.float_dtype))
    writer.finish()
    write_config(job.model, folder, job.float_dtype)
    exporter.annotate(folder, job.records)
