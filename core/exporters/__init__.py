"""Exporters: one quantized model, written in the format a consumer loads.

The formats are plugins (`compquant_register_exporters`); this package holds what they share. Every
exporter reads the same `ExportJob` (the model, its `QuantizedLinear` records and the online
operations attached to it) and first says whether its format can express the run at all
(`Exporter.unsupported`), so that a format that cannot is refused with the reason before anything
is written, and ``auto`` picks the first format that can. docs/formats.md describes each format.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .base import ExportError, Exporter, ExportJob, ShardWriter, write_config

if TYPE_CHECKING:
    from ..registry import PluginRegistry

log = logging.getLogger(__name__)

AUTO = "auto"


def format_names(registry: PluginRegistry) -> list[str]:
    """What ``--format`` accepts: ``auto`` and every registered exporter."""
    return [AUTO, *registry.names("exporter")]


def auto_order(registry: PluginRegistry) -> list[Exporter]:
    """The exporters ``auto`` tries, in order."""
    ranked = [entry.obj for entry in registry.table("exporter").values() if entry.obj.auto_rank is not None]
    return sorted(ranked, key=lambda exporter: exporter.auto_rank)


def check_format(format: str, registry: PluginRegistry) -> None:
    """Refuse a format name nothing registered, listing the ones that are."""
    if format not in format_names(registry):
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(format_names(registry))}")


def choose_exporter(format: str, job: ExportJob, registry: PluginRegistry) -> Exporter:
    """The exporter for ``format``, or for ``auto`` the first of `auto_order` that can express the
    run; a named format that cannot is an `ExportError` naming why and what to do instead."""
    check_format(format, registry)
    if format == AUTO:
        for exporter in auto_order(registry):
            reason = exporter.unsupported(job)
            if reason is None:
                return exporter
            log.info("not exporting as %s: %s", exporter.name, reason)
        raise ExportError("no registered export format can express this run")
    exporter = registry.get("exporter", format)
    reason = exporter.unsupported(job)
    if reason is not None:
        raise ExportError(f"format {format!r} cannot express this model: {reason}")
    return exporter


def write_export(exporter: Exporter, job: ExportJob, folder: Path) -> dict[str, str]:
    """Write ``job`` in ``exporter``'s format into the empty ``folder``; return what to record."""
    exporter.write(job, folder)
    return {"format": exporter.name, "dtype": str(job.float_dtype).removeprefix("torch.")}


__all__ = ["AUTO", "ExportError", "ExportJob", "Exporter", "ShardWriter", "auto_order", "check_format",
           "choose_exporter", "format_names", "write_config", "write_export"]
