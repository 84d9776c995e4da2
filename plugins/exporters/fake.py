"""The fake-quantized model: every quantized weight stored de-quantized, in the model's own
layout, for research use. It expresses every run, timm models included; online operations are
recorded beside it (see `compquant.core.saving`) and re-attached by `compquant.load_model`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ...core.exporters.base import Exporter, ExportJob
from ...core.plugin_manager import hookimpl
from ...core.qlinear import QuantizedLinear


class FakeQuantExporter(Exporter):
    name = "fake"
    description = "de-quantized weights in the model's own layout (any run; compquant re-attaches online ops)"
    auto_rank = 100

    def convert_linear(self, record: QuantizedLinear, dtype: torch.dtype) -> dict[str, Tensor]:
        return {"weight": record.dequantize(dtype)}

    def write(self, job: ExportJob, folder: Path) -> None:
        if job.is_transformers_model:
            super().write(job, folder)
        else:  # a timm model: the layout timm's local-dir: loader reads
            from timm.models import save_for_hf

            save_for_hf(job.model, folder, safe_serialization=True)


@hookimpl
def compquant_register_exporters(register) -> None:
    register(FakeQuantExporter.name, FakeQuantExporter())
