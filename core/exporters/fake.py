"""The fake-quantized model: every quantized weight stored de-quantized, in the model's own
layout, for research use. It expresses every run; online input operations are recorded beside
it (see `compquant.core.saving`) and re-attached by `compquant.load_model`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Exporter, ExportJob, dense_state_dict, write_transformers_checkpoint


class FakeQuantExporter(Exporter):
    name = "fake"
    description = "de-quantized weights in the model's own layout (any run; compquant re-attaches online ops)"

    def unsupported(self, job: ExportJob) -> str | None:
        return None

    def write(self, job: ExportJob, folder: Path) -> dict[str, Any]:
        if job.is_transformers_model:
            write_transformers_checkpoint(job, folder, dense_state_dict(job), quantization_config=None)
        else:  # a timm model: config.json and model.safetensors that timm's local-dir: loader reads
            from timm.models import save_for_hf

            save_for_hf(job.model, folder, safe_serialization=True)
        return {"format": self.name}
