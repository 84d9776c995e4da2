"""`quantize`: a whole model, from a config, through the plugins it names."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import Tensor, nn

from .adapter import ArchitectureAdapter
from .calibration import CalibrationPlan, calibrate
from .block_store import StreamedBlocks
from .checkpoint import BlockCheckpoint, run_fingerprint
from .config import QuantConfig
from .function_check import FunctionCheck
from .plugin_manager import default_plugin_manager, registry_for
from .registry import PluginRegistry
from .report import QuantReport
from .transform import TransformContext

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    """The named device, or CUDA when present and the CPU otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
    return device


def check_plugins(config: QuantConfig, registry: PluginRegistry) -> None:
    """Resolve the solver and transform names in ``config`` and validate their options, so that a bad
    name or option fails before a model is loaded."""
    registry.get("solver", config.solver).options(config.solver_options)
    check_transforms(config.transforms, config.transform_options, registry)


def check_transforms(names: Sequence[str], options: dict[str, dict[str, Any]], registry: PluginRegistry) -> None:
    """Resolve every transform name and validate its options; options for a transform not named
    are an error too (most likely a typo)."""
    for name in names:
        registry.get("transform", name).options(options.get(name))
    unused = set(options) - set(names)
    if unused:
        raise ValueError(f"transform_options given for {sorted(unused)}, which are not in transforms {list(names)}")


def apply_transforms(
    model: nn.Module,
    names: Sequence[str],
    registry: PluginRegistry,
    adapter: ArchitectureAdapter,
    context: TransformContext,
    options: dict[str, dict[str, Any]] | None = None,
    *,
    check: bool = True,
    tolerance: float | None = None,
) -> None:
    """Run the named transforms on ``model`` in order, each with its options from ``options``. With
    ``check``, the model's logits on one probe window are compared after each transform with those
    from before (see `compquant.core.function_check`), and a transform that moved them more than
    ``tolerance`` stops the run with a `FunctionChangedError` naming it."""
    if not names:
        return
    function = FunctionCheck.start(model, adapter, context.calibration, tolerance) if check else None
    for name in names:
        log.info("applying transform %s", name)
        transform = registry.get("transform", name)
        transform.apply(model, adapter, transform.options((options or {}).get(name)), context)
        if function is not None:
            function.verify(model, name)


def plan_for(model: nn.Module, config: QuantConfig, registry: PluginRegistry) -> CalibrationPlan:
    """Resolve every name in ``config`` and validate every option, before any work is done."""
    check_plugins(config, registry)
    solver = registry.get("solver", config.solver)
    return CalibrationPlan(
        adapter=registry.adapter_for(model, config.adapter),
        solver_name=config.solver,
        solver=solver,
        options=solver.options(config.solver_options),
        grid=config.grid.grid(),
        device=resolve_device(config.device),
        stats_dtype=getattr(torch, config.stats_dtype),
        fp_inputs=config.calibration.fp_inputs,
        sequential=config.calibration.sequential,
        fp_cache_bytes=config.calibration.fp_cache_mib * 2**20,
    )


def needs_calibration(config: QuantConfig, registry: PluginRegistry) -> bool:
    """Whether a run of ``config`` needs calibration inputs: its solver asks for statistics, or a
    transform learns from data."""
    solver = registry.get("solver", config.solver)
    learns = any(registry.get("transform", name).needs_calibration for name in config.transforms)
    return learns or bool(solver.statistics(solver.options(config.solver_options)))


def quantize(
    model: nn.Module,
    config: QuantConfig,
    *,
    calibration: Tensor | Sequence[Tensor] | None = None,
    plugin_manager: pluggy.PluginManager | None = None,
    resume_dir: str | Path | None = None,
    block_store: StreamedBlocks | None = None,
) -> QuantReport:
    """Apply ``config.transforms`` and quantize ``model`` in place with ``config.solver``.

    ``calibration`` is either a (samples, ...) tensor of model inputs (token ids for a language
    model), split into batches of ``config.calibration.batch_size``, or a sequence of ready batches;
    it may be None only when `needs_calibration` is False. (`compquant.quantize` draws it from
    ``config.calibration.dataset`` when given a tokenizer.) With ``resume_dir``, progress is kept
    there after every block and a run killed part way continues from it (see
    `compquant.core.checkpoint`); remove the folder once the result is saved. ``block_store``
    streams the blocks of a weightless skeleton from disk (low-memory mode, see
    `compquant.core.low_memory`). Returns the per-layer report, whose ``records`` the exporters read.
    """
    pm = plugin_manager or default_plugin_manager()
    registry = registry_for(plugin_manager)
    plan = plan_for(model, config, registry)
    if calibration is None and needs_calibration(config, registry):
        raise ValueError(
            f"solver {config.solver!r} (or a transform) needs calibration data: pass calibration=<model inputs>, or call "
            "compquant.quantize with a tokenizer so that windows are drawn from calibration.dataset"
        )
    batches = _batches(calibration, config) if calibration is not None else None
    checkpoint = None
    if resume_dir is not None:
        settings = config.model_dump(mode="json", exclude={"output", "data_dir", "model"})
        checkpoint = BlockCheckpoint(resume_dir, run_fingerprint(model, batches, settings))
        checkpoint.blocks_done()  # a checkpoint of another run fails here, before any work
    context = TransformContext(torch.cat(list(batches)) if batches else None, plan.grid, config.seed)
    apply_transforms(model, config.transforms, registry, plan.adapter, context, config.transform_options,
                     check=config.transform_check, tolerance=config.transform_tolerance)
    pm.hook.compquant_before_calibration(model=model, adapter=plan.adapter, config=config)
    report = calibrate(model, plan, batches if plan.wanted else None, hook=pm.hook, checkpoint=checkpoint,
                       store=block_store)
    pm.hook.compquant_after_calibration(model=model, report=report, config=config)
    return report


def _batches(calibration: Tensor | Sequence[Tensor], config: QuantConfig) -> list[Tensor]:
    if isinstance(calibration, Tensor):
        return list(calibration.split(config.calibration.batch_size))
    return list(calibration)
