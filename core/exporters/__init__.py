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

from .base import ExportError, Exporter, ExportJob, ShardWriter, shard_size_bytes, write_config

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
                log.info("auto: exporting as %s, the first format that can express the run", exporter.name)
                return exporter
            log.info("auto: not exporting as %s: %s", exporter.name, reason)
        raise ExportError("no registered export format can express this run")
    exporter = registry.get("exporter", format)
    reason = exporter.unsupported(job)
    if reason is not None:
        raise ExportError(f"format {format!r} cannot express this model: {reason}")
    return exporter


def check_planned_export(format: str, job: ExportJob, registry: PluginRegistry) -> None:
    """Before the work, on a planned ``job``: refuse a named ``format`` that cannot store the run's
    layouts or online ops, with the reason; for ``auto``, log the format the layouts allow (the
    choice is made once the numbers are known: GPTQ v1 also depends on the zero points)."""
    check_format(format, registry)
    if format != AUTO:
        reason = registry.get("exporter", format).unsupported_layout(job)
        if reason is not None:
            raise ExportError(f"format {format!r} cannot express this run: {reason}. Nothing was done")
        return
    for exporter in auto_order(registry):
        reason = exporter.unsupported_layout(job)
        if reason is None:
            log.info("auto: the run can be exported as %s (checked again once it is quantized)", exporter.name)
            return
        log.info("auto: cannot export as %s: %s", exporter.name, reason)
    raise ExportError("no registered export format can express this run")


def write_export(exporter: Exporter, job: ExportJob, folder: Path) -> dict[str, str]:
    """Write ``job`` in ``exporter``'s format into the empty ``folder``; return what to record."""
    exporter.write(job, folder)
    return {"format": exporter.name, "dtype": str(job.float_dtype).removeprefix("torch.")}


__all__ = ["AUTO", "ExportError", "ExportJob", "Exporter", "ShardWriter", "auto_order", "check_format",
           "check_planned_export", "choose_exporter", "format_names", "shard_size_bytes", "write_config", "write_export"]
