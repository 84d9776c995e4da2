"""Exporters: one quantized model, written in the format a consumer loads.

Every exporter reads the same `ExportJob` (the model, its `QuantizedLinear` records and the
online operations attached to it) and first says whether its format can express the run at all
(`Exporter.unsupported`), so that a format that cannot is refused with the reason before anything
is written, and ``auto`` picks the first format that can.
"""
from __future__ import annotations

import logging

from .base import ExportError, Exporter, ExportJob
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


__all__ = ["AUTO_ORDER", "EXPORTERS", "FORMATS", "ExportError", "ExportJob", "Exporter", "choose_exporter"]
