"""What every exporter shares: the job it reads, its interface, and writing a Hugging Face
checkpoint (sharded safetensors with an index, config.json with a quantization section)."""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CompquantError
from ..qlinear import QuantizedLinear


class ExportError(CompquantError):
    """A model that the chosen format cannot express, or an unknown format."""


@dataclass(frozen=True)
class ExportJob:
    """A quantized model and what the exporters need to know about it."""

    model: nn.Module
    records: dict[str, QuantizedLinear]
    online_ops: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    """Floating dtype of the written tensors (scales and unquantized weights); None keeps the model's."""
    max_shard_size: str | int = "5GB"

    @property
    def is_transformers_model(self) -> bool:
        return hasattr(self.model, "save_pretrained") and hasattr(self.model, "config")

    @property
    def float_dtype(self) -> torch.dtype:
        return self.dtype or next(self.model.parameters()).dtype


class Exporter(ABC):
    """Writes a quantized model into a folder in one format."""

    name: str
    description: str

    @abstractmethod
    def unsupported(self, job: ExportJob) -> str | None:
        """Why this format cannot express ``job``, with what to do instead; None when it can."""

    @abstractmethod
    def write(self, job: ExportJob, folder: Path) -> dict[str, Any]:
        """Write the model files into the existing, empty ``folder``; return what to record about
        the export (format and its settings)."""


def online_ops_problem(job: ExportJob, format_name: str) -> str | None:
    """The reason a plain checkpoint cannot hold a model with online input operations."""
    if not job.online_ops:
        return None
    where = ", ".join(sorted(job.online_ops)[:3]) + (" ..." if len(job.online_ops) > 3 else "")
    return (
        f"the model has online input operations (e.g. QuaRot's R4 Hadamard in front of {where}) that a {format_name} "
        "checkpoint cannot express and its consumers would not run; export with --format fake (compquant.load_model "
        "re-attaches them), or quantize a fused-only variant without online rotations "
        "(transform_options: {quarot: {r4: false}})"
    )


def dense_state_dict(job: ExportJob) -> dict[str, Tensor]:
    """The model's tensors in the export dtype, each storage once (tied embeddings keep the first
    name, which transformers re-ties on load from the config)."""
    seen: set[int] = set()
    state: dict[str, Tensor] = {}
    for name, tensor in job.model.state_dict().items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        state[name] = tensor.detach().to(job.float_dtype) if tensor.is_floating_point() else tensor.detach()
    return state


def write_transformers_checkpoint(
    job: ExportJob, folder: Path, state: dict[str, Tensor], quantization_config: dict[str, Any] | None
) -> None:
    """Sharded safetensors (with an index when there is more than one shard) and config.json, with
    ``quantization_config`` when given."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, folder, max_shard_size=job.max_shard_size)
    job.model.config.save_pretrained(folder)
    generation = getattr(job.model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(job.float_dtype).removeprefix("torch.")
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
