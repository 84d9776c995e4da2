"""Exporters: one quantized model, written in the format a consumer loads.

Every exporter reads the same `ExportJob` (the model, its `QuantizedLinear` records and the
online operations attached to it) and first says whether its format can express the run at all
(`Exporter.unsupported`), so that a format that cannot is refused with the reason before anything
is written, and ``auto`` picks the first format that can.
"""
from __future__ import annotations

import logging

from pathlib import Path

from .base import ExportError, Exporter, ExportJob, ShardWriter, write_config, write_model
from .compressed_tensors import CompressedTensorsExporter
from .fake import FakeQuantExporter
from .gptq import GptqExporter

log = logging.getLogger(__name__)

EXPORTERS: dict[str, Exporter] = {
    exporter.name: exporter
    for exporter in (CompressedTensorsExporter(), GptqExporter(version=1), GptqExporter(version=2), FakeQuantExporter())
}
AUTO_ORDER = ("compressed-tensors", "gptq", "fake")
FORMATS = ("auto", *EXPORTERS)


def choose_exporter(format: str, job: ExportJob) -> Exporter:
    """The exporter for ``format``, or for ``auto`` the first of `AUTO_ORDER` that can express the
    run; a named format that cannot is an `ExportError` naming why and what to do instead."""
    if format == "auto":
        for name in AUTO_ORDER:
            reason = EXPORTERS[name].unsupported(job)
            if reason is None:
                return EXPORTERS[name]
            log.info("not exporting as %s: %s", name, reason)
        raise ExportError("no export format can express this run")  # fake expresses every run
    if format not in EXPORTERS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    reason = EXPORTERS[format].unsupported(job)
    if reason is not None:
        raise ExportError(f"format {format!r} cannot express this model: {reason}")
    return EXPORTERS[format]


def write_export(exporter: Exporter, job: ExportJob, folder: Path) -> dict[str, str]:
    """Write ``job`` in ``exporter``'s format into the empty ``folder``; return what to record."""
    if job.is_transformers_model:
        write_model(exporter, job, folder)
    else:  # a timm model, which only the fake format takes: the layout timm's local-dir: loader reads
        from timm.models import save_for_hf

        save_for_hf(job.model, folder, safe_serialization=True)
    return {"format": exporter.name, "dtype": str(job.float_dtype).removeprefix("torch.")}


__all__ = ["AUTO_ORDER", "EXPORTERS", "FORMATS", "ExportError", "ExportJob", "Exporter", "ShardWriter", "choose_exporter",
           "write_config", "write_export"]
