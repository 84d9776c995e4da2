"""`quantize`: a whole model, from a config, through the plugins it names."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import Tensor, nn

from .adapter import ArchitectureAdapter
from .calibration import CalibrationPlan, calibrate
from .learner import BlockLearning
from .block_store import StreamedBlocks
from .checkpoint import BlockCheckpoint, run_fingerprint
from .distributed import Ranks, SharedCheckpoint, local_device
from .config import QuantConfig, check_device_name
from .finite import check_input_weights
from .function_check import FunctionCheck
from .exporters import ExportJob
from .lock import exclusive
from .online import describe_online_ops
from .options import checked_options
from .plugin_manager import default_plugin_manager, registry_for
from .qlinear import LinearLayout
from .registry import PluginRegistry
from .report import QuantReport
from .routing import ALL_TOKENS
from .solver import Solver
from .transform import TransformContext

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    """The named device, or CUDA when present and the CPU otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(name)
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not one compquant runs on; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA devices "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def check_plugins(config: QuantConfig, registry: PluginRegistry) -> None:
    """Resolve the solver, learner and transform names in ``config`` and validate their options, so
    that a bad name or option fails before a model is loaded."""
    checked_options(registry.get("solver", config.solver), config.solver_options, f"solver {config.solver!r}")
    check_learner(config, registry)
    check_transforms(config.transforms, config.transform_options, registry)


def check_learner(config: QuantConfig, registry: PluginRegistry) -> BlockLearning | None:
    """The run's learner with its validated options, or None without one. Learner options without
    a learner, and the clip search beside a learner that learns the clipping, are errors."""
    if config.learner is None:
        if config.learner_options:
            raise ValueError(f"learner_options {sorted(config.learner_options)} are given but no learner; name one "
                             "with --learner (`compquant plugins` lists them) or drop the options")
        return None
    learner = registry.get("learner", config.learner)
    options = checked_options(learner, config.learner_options, f"learner {config.learner!r}")
    learning = BlockLearning(config.learner, learner, options, config.seed)
    if config.grid.clip and learning.learns_ranges:
        raise ValueError(f"--clip searches each group's clipping range, which learner {config.learner!r} learns itself; "
                         "drop --clip")
    return learning


def check_transforms(names: Sequence[str], options: dict[str, dict[str, Any]], registry: PluginRegistry) -> None:
    """Resolve every transform name and validate its options; options for a transform not named
    are an error too (most likely a typo)."""
    for name in names:
        checked_options(registry.get("transform", name), options.get(name), f"transform {name!r}")
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
    """Resolve every name in ``config`` and validate every option, before any work is done. The
    adapter's `ArchitectureAdapter.prepare` runs here, so that the plan sees the linears it will
    quantize (fused experts become linears; the model's function is kept)."""
    check_plugins(config, registry)
    solver = registry.get("solver", config.solver)
    adapter = registry.adapter_for(model, config.adapter)
    adapter.prepare(model)
    check_group_size(config.grid.group_size, [width for _, (_, width) in quantized_linears(model, adapter)])
    ranks, device = Ranks.current(), resolve_device(config.device)
    if config.learner is not None:
        check_single_process_learner(config.learner, ranks.world)
    return CalibrationPlan(
        adapter=adapter,
        solver_name=config.solver,
        solver=solver,
        options=solver.options(config.solver_options),
        grid=config.grid.grid(),
        device=local_device(device) if ranks.world > 1 else device,
        stats_dtype=getattr(torch, config.stats_dtype),
        fp_inputs=config.calibration.fp_inputs,
        sequential=config.calibration.sequential,
        fp_cache_bytes=config.calibration.fp_cache_mib * 2**20,
        routed_min_tokens=config.calibration.expert_min_tokens,
        routed_fallback=config.calibration.expert_fallback,
        fallback_solver=fallback_solver(config.calibration.expert_fallback, registry),
        learning=check_learner(config, registry),
        ranks=ranks,
    )


def check_single_process_learner(learner: str, world: int) -> None:
    """Learners train on one process: each rank would learn from its own share of the batches and the
    ranks' weights would part (their gradients are not reduced across ranks yet)."""
    if world > 1:
        raise ValueError(f"learner {learner!r} runs on one process only, not on {world} ranks (each rank would learn "
                         "from its own batches and their weights would differ); run without torchrun or --nproc")


def fallback_solver(name: str, registry: PluginRegistry) -> Solver | None:
    """The solver ``calibration.expert_fallback`` names, which must need no statistics (an expert
    that falls back has too few tokens for them); None for ``all-tokens``."""
    if name == ALL_TOKENS:
        return None
    solver = registry.get("solver", name)
    if solver.statistics(solver.options({})):
        raise ValueError(f"calibration.expert_fallback must be {ALL_TOKENS!r} or a solver that needs no calibration "
                         f"statistics (such as rtn), but {name!r} needs them: an expert with too few tokens has none")
    return solver


def quantized_linears(model: nn.Module, adapter: ArchitectureAdapter) -> list[tuple[str, tuple[int, int]]]:
    """(path, (out, in) shape) of every linear the calibration loop will quantize, in order."""
    return [(f"{adapter.blocks}.{index}.{name}", tuple(block.get_submodule(name).weight.shape))
            for index, block in enumerate(adapter.block_list(model)) for name in adapter.for_block(block).linears()]


def check_group_size(group_size: int, widths: Sequence[int]) -> None:
    """Refuse a group size wider than every linear: it would silently mean one group per row."""
    if widths and group_size > max(widths):
        raise ValueError(
            f"group size {group_size} is larger than every quantized linear's input width (the widest is {max(widths)}), "
            "so every row would be one group; ask for that with --group-size -1, or choose a size up to "
            f"{max(widths)}"
        )


def planned_export(model: nn.Module, config: QuantConfig, registry: PluginRegistry, dtype: torch.dtype | None = None,
                   max_shard_size: str | int = "5GB") -> ExportJob:
    """The export job a run of ``config`` on ``model`` will produce, as far as it is known before the
    work: every quantized linear's layout, and the online ops the model has or its transforms attach
    (placeholders named after the transform). `compquant.core.exporters.check_planned_export` reads it."""
    plan = plan_for(model, config, registry)
    act_order, in_order = plan.solver.column_order(plan.options, plan.grid)
    in_order = in_order or (plan.learning is not None and plan.learning.learns_ranges)  # learned groups stay in place
    grid = plan.grid
    layouts = {name: LinearLayout(shape, grid.bits, grid.group_size, grid.sym, act_order, in_order)
               for name, shape in quantized_linears(model, plan.adapter)}
    online = describe_online_ops(model, registry)
    for name in config.transforms:
        transform = registry.get("transform", name)
        if transform.attaches_online_ops(transform.options(config.transform_options.get(name))):
            online[f"{name} (transform)"] = []
    return ExportJob(model, {}, online, dtype, max_shard_size, planned=layouts)


def needs_calibration(config: QuantConfig, registry: PluginRegistry) -> bool:
    """Whether a run of ``config`` needs calibration inputs: its solver asks for statistics, a
    learner trains, or a transform learns from data."""
    solver = registry.get("solver", config.solver)
    learns = config.learner is not None or any(registry.get("transform", name).needs_calibration
                                                for name in config.transforms)
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
    """Apply ``config.transforms`` and quantize ``model`` in place with ``config.solver``, after
    ``config.learner`` (when there is one) trained each block.

    ``calibration`` is either a (samples, ...) tensor of model inputs (token ids for a language
    model), split into batches of ``config.calibration.batch_size``, or a sequence of ready batches;
    it may be None only when `needs_calibration` is False. (`compquant.quantize` draws it from
    ``config.calibration.dataset`` when given a tokenizer.) With ``resume_dir``, progress is kept
    there after every block and a run killed part way continues from it (see
    `compquant.core.checkpoint`); remove the folder once the result is saved. ``block_store``
    streams the blocks of a weightless skeleton from disk (low-memory mode, see
    `compquant.core.low_memory`). Returns the per-layer report, whose ``records`` the exporters read.

    Called on every rank of an initialised `torch.distributed` process group (torchrun), with the
    same model, config and calibration on each, it runs as one job over the ranks (see
    `compquant.core.distributed`): each rank calibrates its share of the batches, and only rank 0
    writes the resume checkpoint. Every rank returns the whole report.
    """
    pm = plugin_manager or default_plugin_manager()
    registry = registry_for(plugin_manager)
    plan = plan_for(model, config, registry)
    if calibration is None and needs_calibration(config, registry):
        raise ValueError(
            f"solver {config.solver!r} (or the learner or a transform) needs calibration data: pass "
            "calibration=<model inputs>, or call "
            "compquant.quantize with a tokenizer so that windows are drawn from calibration.dataset"
        )
    batches = _batches(calibration, config, model, plan.adapter) if calibration is not None else None
    check_input_weights(model.state_dict().items(), type(model).__name__)
    ranks = plan.ranks
    with exclusive(resume_dir) if resume_dir is not None and ranks.main else nullcontext():
        checkpoint = None
        if resume_dir is not None:
            settings = config.model_dump(mode="json", exclude={"output", "data_dir", "model"})
            checkpoint = BlockCheckpoint(resume_dir, run_fingerprint(model, batches, settings))
            checkpoint.blocks_done()  # a checkpoint of another run fails here, before any work
            if ranks.world > 1:
                checkpoint = SharedCheckpoint(checkpoint, ranks)
        context = TransformContext(torch.cat(list(batches)) if batches else None, plan.grid, config.seed)
        apply_transforms(model, config.transforms, registry, plan.adapter, context, config.transform_options,
                         check=config.transform_check, tolerance=config.transform_tolerance)
        pm.hook.compquant_before_calibration(model=model, adapter=plan.adapter, config=config)
        try:
            report = calibrate(model, plan, ranks.share(batches) if plan.uses_data else None, hook=pm.hook,
                               checkpoint=checkpoint, store=block_store)
        except ArithmeticError:  # NaN or Inf: the same inputs would meet them again, so resuming cannot help
            if checkpoint is not None:
                checkpoint.discard()
            raise
    pm.hook.compquant_after_calibration(model=model, report=report, config=config)
    return report


def _batches(calibration: Tensor | Sequence[Tensor], config: QuantConfig, model: nn.Module,
             adapter: ArchitectureAdapter) -> list[Tensor]:
    """The calibration inputs as batches, checked (token ids, where the model reads tokens)."""
    given = [calibration] if isinstance(calibration, Tensor) else list(calibration)
    if not given or any(inputs.numel() == 0 for inputs in given):
        raise ValueError("the calibration inputs are empty; pass (samples, seqlen) token ids with at least one window")
    embedding = model.get_submodule(adapter.embedding) if adapter.embedding else None
    if isinstance(embedding, nn.Embedding):
        for inputs in given:
            check_token_ids(inputs, embedding.num_embeddings, "calibration")
    return list(calibration.split(config.calibration.batch_size)) if isinstance(calibration, Tensor) else given


def check_token_ids(ids: Tensor, vocabulary: int, what: str) -> None:
    """Refuse ``ids`` unless they are a (windows, tokens) integer tensor of ids in ``[0, vocabulary)``,
    saying what was expected instead of failing deep inside the model."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what} token ids must be an integer tensor, got {ids.dtype}; pass the tokenizer's input_ids "
                         "(torch.long)")
    if ids.dim() != 2:
        hint = "; for one window use ids.unsqueeze(0)" if ids.dim() == 1 else ""
        raise ValueError(f"{what} token ids must be (windows, tokens), got shape {tuple(ids.shape)}{hint}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocabulary:
        raise ValueError(f"{what} token ids must lie in [0, {vocabulary}) (the model's vocabulary), found ids from "
                         f"{low} to {high}; tokenize with the model's own tokenizer")
