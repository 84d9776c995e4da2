"""The fake-quantized model: every quantized weight stored de-quantized, in the model's own
layout, for research use. It expresses every run; online operations are recorded beside
it (see `compquant.core.saving`) and re-attached by `compquant.load_model`."""
from __future__ import annotations

import torch
from torch import Tensor

from ..qlinear import QuantizedLinear
from .base import Exporter, ExportJob


class FakeQuantExporter(Exporter):
    name = "fake"
    description = "de-quantized weights in the model's own layout (any run; compquant re-attaches online ops)"

    def unsupported(self, job: ExportJob) -> str | None:
        return None

    def convert_linear(self, record: QuantizedLinear, dtype: torch.dtype) -> dict[str, Tensor]:
        return {"weight": record.dequantize(dtype)}
