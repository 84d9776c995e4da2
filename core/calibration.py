"""The layer-by-layer calibration loop (docs/methods.md §4).

The inputs of the first block are caught once; then, block after block, `quantize_block` quantizes
the block's linears group by group in the adapter's true-sequential order and hands the calibration
activations on to the next block. Only the current block sits on the compute device.

One pass per block (``sequential: groups``, the default): every calibration batch goes through the
block once per stream, as a `PausedForward` that stops in front of each group of linears. When all
batches wait in front of a group, its statistics are complete (the batches' inputs added in batch
order); the group is quantized, and the batches go on through its quantized weights to the next
group. What comes out of the last group is the next block's input. So each group is calibrated on
the outputs of the already quantized groups before it, and each linear runs once per batch per
stream per block. ``sequential: blocks`` (llm-compressor's loop) takes every group's statistics from
one pass of the unquantized block, then quantizes all groups and propagates with a second pass.

When a statistic needs the full-precision inputs X̃ (the cross term ``dXXT`` does), a full-precision
stream runs beside the quantized one, and both streams' inputs of a group are added together, batch
by batch. ``stream``: an unquantized copy of the block runs each batch beside the quantized one,
stopped at the same groups (memory of one block copy). ``cache``: the still unquantized block runs
each batch once before its first group is quantized, keeping every group's inputs and the block's
outputs (memory of tokens × the group input widths of one block, no copy). ``auto`` caches when that
fits ``fp_cache_mib``. Nothing is kept beyond the current block.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .adapter import ArchitectureAdapter
from .block_store import ResidentBlocks, StreamedBlocks
from .checkpoint import BlockCheckpoint
from .distributed import Ranks, SharedCheckpoint
from .errors import NonFiniteError
from .finite import describe, non_finite
from .memory import return_freed_memory
from .paused_forward import PausedForward
from .qlinear import QuantizedLinear
from .quantizer import Grid
from .report import LayerReport, QuantReport
from .solver import LayerResult, Solver, SolverOptions
from .statistics import LayerStatistics, NonFiniteStatisticsError, Statistic, StatisticsAccumulator, needs_fp_inputs
from .progress import progress

log = logging.getLogger(__name__)


class _Caught(Exception):
    """Raised by a capture hook to stop a forward pass once the wanted input is seen."""


@dataclass
class Activations:
    """The calibration activations entering a block, one tensor per batch: ``hidden`` of the model
    quantized up to this block, ``fp_hidden`` of the full-precision model (None unless a statistic
    needs X̃), and the keyword arguments (masks, positions) the model passes its blocks per batch."""

    hidden: list[Tensor]
    kwargs: list[dict[str, Any]]
    fp_hidden: list[Tensor] | None = None


LayerDone = Callable[[nn.Module, LayerReport, LayerResult], None]
"""Called with each linear, its report and the solver's result once its quantized weight is in place."""


@dataclass(frozen=True)
class CalibrationPlan:
    """What to quantize and how; built by `compquant.quantize` from a config."""

    adapter: ArchitectureAdapter
    solver_name: str
    solver: Solver
    options: SolverOptions
    grid: Grid
    device: torch.device
    stats_dtype: torch.dtype = torch.float32
    fp_inputs: Literal["auto", "stream", "cache"] = "auto"
    fp_cache_bytes: int = 2 * 2**30
    sequential: Literal["groups", "blocks"] = "groups"
    ranks: Ranks = Ranks()
    """The processes the run is spread over (`compquant.core.distributed`); one by default."""

    @property
    def wanted(self) -> frozenset[Statistic]:
        return self.solver.statistics(self.options)

    @property
    def needs_fp_inputs(self) -> bool:
        """Whether the statistics take the full-precision stream."""
        return needs_fp_inputs(self.wanted)

    def accumulator(self, columns: int) -> StatisticsAccumulator:
        """An empty accumulator of the solver's statistics for inputs of width ``columns``."""
        return StatisticsAccumulator(columns, self.wanted, dtype=self.stats_dtype, device=self.device)


def calibrate(
    model: nn.Module,
    plan: CalibrationPlan,
    batches: Sequence[Tensor] | None,
    hook: Any | None = None,
    checkpoint: BlockCheckpoint | SharedCheckpoint | None = None,
    store: ResidentBlocks | StreamedBlocks | None = None,
) -> QuantReport:
    """Quantize every linear the adapter names, in place. ``batches`` are the model's calibration
    inputs (token ids for language models); they may be None only for solvers that use no
    statistics. ``hook`` is the plugin manager's hook relay, or None to call no hooks. With a
    ``checkpoint``, blocks it records as finished are reloaded instead of quantized again, and
    every newly finished block is recorded in it. ``store`` says where blocks come from and go to
    (default: they are in memory; see `compquant.core.block_store`)."""
    started = time.perf_counter()
    if plan.wanted and not batches:
        raise ValueError(f"solver {plan.solver_name!r} needs calibration data; none was given")
    report = QuantReport(solver=plan.solver_name)
    blocks = plan.adapter.block_list(model)
    store = store or ResidentBlocks(plan.device)

    def finished(layer: nn.Module, layer_report: LayerReport, result: LayerResult) -> None:
        report.layers.append(layer_report)
        report.records[layer_report.name] = QuantizedLinear.from_result(result, plan.grid)
        if hook is not None:
            hook.compquant_after_layer(name=layer_report.name, layer=layer, result=result, layer_report=layer_report,
                                       report=report)

    with torch.inference_mode():
        activations = None
        store.prepare_outside(model, blocks)
        if plan.wanted:
            activations = _catch_block_inputs(model, plan, batches)
            report.calibration_tokens = plan.ranks.total(sum(h.shape[:-1].numel() for h in activations.hidden))
        store.release_outside(model, blocks)
        start = _resume(checkpoint, blocks, plan, report, activations) if checkpoint is not None else 0
        for index in progress(range(start, len(blocks)), desc=f"{plan.solver_name} blocks", initial=start,
                              total=len(blocks)):
            block = blocks[index]
            prefix = f"{plan.adapter.blocks}.{index}"
            store.load(prefix, block)
            first = len(report.layers)
            activations = quantize_block(block, activations, plan, prefix, finished)
            done = report.layers[first:]
            records = {layer.name: report.records[layer.name] for layer in done}
            if checkpoint is not None:
                checkpoint.save_block(index, block, records, done, None if activations is None else activations.hidden,
                                      None if activations is None else activations.fp_hidden)
            if hook is not None:
                hook.compquant_after_block(index=index, block=block, report=report)
            report.records.update(store.release(prefix, block, records))
            return_freed_memory()
    report.seconds = time.perf_counter() - started
    return report


def quantize_block(
    block: nn.Module, inputs: Activations | None, plan: CalibrationPlan, prefix: str, finished: LayerDone
) -> Activations | None:
    """Quantize the adapter's linears of ``block`` in place, group by group, calibrated on
    ``inputs``, and return the activations the quantized block hands on (docs/methods.md §4).
    ``prefix`` is the block's path in the model, for reports and errors; ``finished`` is called with
    each linear as soon as its quantized weight is in place. ``inputs`` is None only for a solver
    that uses no statistics: then nothing runs and None is returned.

    This is the loop's unit of work: it needs nothing but its arguments and keeps nothing. An
    exception (a solver's error, non-finite values, an interrupt) leaves no forward paused."""
    groups = plan.adapter.groups  # the one place the loop reads the adapter's groups
    if inputs is None:
        for group in groups:
            _solve(block, group, None, plan, prefix, finished)
        return None
    batches = range(len(inputs.hidden))
    with contextlib.ExitStack() as running:
        full_precision = _full_precision(block, groups, inputs, plan, prefix, running)  # before anything is quantized
        streams = _Streams(running.enter_context(_PausedStream(block, groups, inputs.hidden, inputs.kwargs, prefix)),
                           full_precision)
        if plan.sequential == "groups":
            for index, group in enumerate(groups):
                statistics = _GroupStatistics(plan, f"{prefix}.{group[0]}")
                for batch in batches:
                    statistics.add(*streams.inputs(index, batch))
                _solve(block, group, statistics.result(), plan, prefix, finished)
            hidden = [streams.finish(batch) for batch in batches]
        else:
            collected = [_GroupStatistics(plan, f"{prefix}.{group[0]}") for group in groups]
            for batch in batches:  # nothing is quantized during this pass, so one batch at a time
                for index, statistics in enumerate(collected):
                    statistics.add(*streams.inputs(index, batch))
                streams.finish(batch)  # the unquantized block's output: not handed on
            for group, statistics in zip(groups, collected):
                _solve(block, group, statistics.result(), plan, prefix, finished)
            hidden = _run_block(block, inputs)
    _check_finite(hidden, prefix)
    return Activations(hidden, inputs.kwargs, streams.fp_hidden)


def _solve(block: nn.Module, group: Sequence[str], stats: LayerStatistics | None, plan: CalibrationPlan, prefix: str,
           finished: LayerDone) -> None:
    layers = [(f"{prefix}.{name}", block.get_submodule(name)) for name in group]
    for (_, layer), (layer_report, result) in zip(layers, _quantize_group(layers, stats, plan)):
        finished(layer, layer_report, result)


def _resume(
    checkpoint: BlockCheckpoint | SharedCheckpoint,
    blocks: Sequence[nn.Module],
    plan: CalibrationPlan,
    report: QuantReport,
    activations: Activations | None,
) -> int:
    """Reload the finished blocks recorded in ``checkpoint`` and the activations entering the next
    one; return the first block left to do."""
    resumed, records, layers = checkpoint.restore(blocks, plan.adapter.blocks, plan.grid)
    report.records.update(records)
    report.layers.extend(layers)
    if resumed.blocks_done and activations is not None:
        activations.hidden = [h.to(plan.device) for h in resumed.hidden]
        if activations.fp_hidden is not None:
            activations.fp_hidden = [h.to(plan.device) for h in resumed.fp_hidden]
    return resumed.blocks_done


def _check_finite(hidden: Sequence[Tensor], prefix: str) -> None:
    if not all(torch.isfinite(h).all() for h in hidden):
        raise NonFiniteStatisticsError(
            f"the outputs of {prefix} hold NaN or Inf after quantization; nothing was written. Check the model in "
            "full precision (compquant eval) and try stats_dtype float64 or a larger percdamp"
        )


def _quantize_group(
    layers: list[tuple[str, nn.Module]], stats: LayerStatistics | None, plan: CalibrationPlan
) -> list[tuple[LayerReport, LayerResult]]:
    """Quantize the linears of one group, which share ``stats``. A solver whose rows are independent
    solves them stacked: one factorization and one column loop for the whole group."""
    started = time.perf_counter()
    weights = [layer.weight.data for _, layer in layers]
    found = non_finite((f"{name}.weight", weight) for (name, _), weight in zip(layers, weights))
    if found:  # the solver's input is broken, not the solver
        raise NonFiniteError(f"NaN or Inf in {describe(found)} before quantization (the solver's input); nothing was "
                             "written. The model was broken before this layer: check it in full precision (compquant eval)")
    if plan.solver.rows_independent and (len(weights) > 1 or plan.ranks.world > 1):
        stacked = plan.ranks.solve_rows(plan.solver, torch.cat(weights), stats, plan.grid, plan.options)
        results = _split_rows(stacked, [weight.shape[0] for weight in weights])
    else:
        results = [plan.solver.solve(weight, stats, plan.grid, plan.options) for weight in weights]
    seconds = (time.perf_counter() - started) / sum(weight.shape[0] for weight in weights)
    done = []
    for (name, layer), weight, result in zip(layers, weights, results):
        if result.weight.shape != weight.shape or not torch.isfinite(result.weight).all():
            raise ArithmeticError(f"solver {plan.solver_name!r} returned a weight of shape {tuple(result.weight.shape)} "
                                  f"with non-finite values for {name}; nothing was written")
        error = None if stats is None or stats.hessian is None else relative_output_error(weight, result.weight, stats.hessian)
        layer.weight.data.copy_(result.weight)
        log.info("%s %s: relative output error %s", plan.solver_name, name, "n/a" if error is None else f"{error:.3e}")
        done.append((LayerReport(name, plan.solver_name, tuple(weight.shape), error, seconds * weight.shape[0]), result))
    return done


def _split_rows(result: LayerResult, rows: list[int]) -> list[LayerResult]:
    """One stacked solve's result, cut back into the linears it was stacked from."""
    parts = [torch.split(tensor, rows) for tensor in (result.weight, result.codes, result.scale, result.zero)]
    return [LayerResult(weight, codes, scale, zero, result.g_idx, result.perm) for weight, codes, scale, zero in zip(*parts)]


def relative_output_error(weight: Tensor, quantized: Tensor, hessian: Tensor) -> float:
    """‖(W − Q)X‖² / ‖WX‖², computed from H ∝ XXᵀ."""
    w = weight.to(hessian.dtype)
    delta = w - quantized.to(hessian.dtype)
    reference = torch.sum((w @ hessian) * w)
    return float(torch.sum((delta @ hessian) * delta) / reference) if reference > 0 else 0.0


def _catch_block_inputs(model: nn.Module, plan: CalibrationPlan, batches: Sequence[Tensor]) -> Activations:
    """Run the model on each batch up to the first block and keep what the block would receive
    (twice over, as the full-precision stream too, when a statistic needs X̃)."""
    blocks = plan.adapter.block_list(model)
    caught = Activations([], [])

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        caught.hidden.append(args[0])
        caught.kwargs.append(kwargs)
        raise _Caught

    moved = _move_outside_blocks(model, blocks, plan.device)
    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                plan.adapter.run(model, batch.to(plan.device))
            except _Caught:
                pass
    finally:
        handle.remove()
        for module, device in moved:
            module.to(device)
    if plan.needs_fp_inputs:
        caught.fp_hidden = list(caught.hidden)
    return caught


class _PausedStream:
    """One stream's batches through ``block``, each a `PausedForward` (started when first asked
    for) that stops in front of every group, at whichever of the group's linears runs first."""

    def __init__(self, block: nn.Module, groups: Sequence[Sequence[str]], hidden: Sequence[Tensor],
                 kwargs: Sequence[dict[str, Any]], prefix: str) -> None:
        self.block, self.groups, self.hidden, self.kwargs, self.prefix = block, groups, hidden, kwargs, prefix
        self.stops = {block.get_submodule(name): index for index, group in enumerate(groups) for name in group}
        self.forwards: list[PausedForward | None] = [None] * len(hidden)

    def __enter__(self) -> _PausedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for forward in self.forwards:
            if forward is not None:
                forward.close()

    def inputs(self, group: int, batch: int) -> Tensor:
        """What group ``group``'s linears receive in batch ``batch``: the batch's forward goes on (through
        the groups before, as they now are) to the group's first linear, and waits there."""
        if self.forwards[batch] is None:
            self.forwards[batch] = PausedForward(self.block, (self.hidden[batch],), self.kwargs[batch], self.stops)
        stop = self.forwards[batch].advance()
        if stop is None:
            raise RuntimeError(f"{self.prefix}.{self.groups[group][0]} was not called when its block ran; the adapter's "
                               "groups do not match the model")
        if stop.key != group:
            name = next(name for name in self.groups[stop.key] if self.block.get_submodule(name) is stop.module)
            raise RuntimeError(f"{self.prefix}.{name} (group {stop.key + 1}) ran before any linear of group {group + 1} "
                               f"({', '.join(self.groups[group])}); the adapter must list its groups in the order in "
                               "which the block calls them")
        return stop.args[0]

    def output(self, batch: int) -> Tensor:
        """The block's output for batch ``batch``, whose forward has passed every group: it runs to the end."""
        forward, self.forwards[batch] = self.forwards[batch], None
        assert forward.advance() is None, "every group has been passed, so the forward cannot stop again"
        return _hidden_of(forward.output)


class _CachedStream:
    """The full-precision inputs of every group and the block's outputs, kept from one pass per batch
    of the still unquantized block (``fp_inputs: cache``); each is handed out once, then dropped."""

    def __init__(self, block: nn.Module, groups: Sequence[Sequence[str]], hidden: Sequence[Tensor],
                 kwargs: Sequence[dict[str, Any]], prefix: str) -> None:
        self.inputs_of: list[list[Tensor | None]] = []
        self.outputs: list[Tensor | None] = []
        with _PausedStream(block, groups, hidden, kwargs, prefix) as stream:
            for batch in range(len(hidden)):
                self.inputs_of.append([stream.inputs(group, batch) for group in range(len(groups))])
                self.outputs.append(stream.output(batch))

    def inputs(self, group: int, batch: int) -> Tensor:
        inputs, self.inputs_of[batch][group] = self.inputs_of[batch][group], None
        return inputs

    def output(self, batch: int) -> Tensor:
        output, self.outputs[batch] = self.outputs[batch], None
        return output


def _full_precision(block: nn.Module, groups: Sequence[Sequence[str]], inputs: Activations, plan: CalibrationPlan,
                    prefix: str, running: contextlib.ExitStack) -> _PausedStream | _CachedStream | None:
    """Where this block's X̃ comes from (``fp_inputs``, see the module docstring), or None when no
    statistic needs it. A paused copy is closed with ``running``."""
    if inputs.fp_hidden is None:
        return None
    widths = sum(block.get_submodule(group[0]).in_features for group in groups)
    size = sum(h.shape[:-1].numel() for h in inputs.fp_hidden) * widths * inputs.fp_hidden[0].element_size()
    cache = plan.fp_inputs == "cache" or (plan.fp_inputs == "auto" and size <= plan.fp_cache_bytes)
    log.debug("full-precision inputs: %s (%.0f MiB if cached)", "cached" if cache else "streamed", size / 2**20)
    if cache:
        return _CachedStream(block, groups, inputs.fp_hidden, inputs.kwargs, prefix)
    return running.enter_context(_PausedStream(copy.deepcopy(block), groups, inputs.fp_hidden, inputs.kwargs, prefix))


class _Streams:
    """The quantized stream's batches through the block and, beside them, the full-precision ones
    (None when no statistic needs X̃), read together batch by batch."""

    def __init__(self, quantized: _PausedStream, full_precision: _PausedStream | _CachedStream | None) -> None:
        self.quantized, self.full_precision = quantized, full_precision
        self.fp_hidden: list[Tensor] | None = None if full_precision is None else []

    def inputs(self, group: int, batch: int) -> tuple[Tensor, Tensor | None]:
        """X and X̃ (or None) of group ``group`` in batch ``batch``."""
        fp_inputs = None if self.full_precision is None else self.full_precision.inputs(group, batch)
        return self.quantized.inputs(group, batch), fp_inputs

    def finish(self, batch: int) -> Tensor:
        """Run batch ``batch`` to the block's end in both streams; keep the full-precision output in
        ``fp_hidden`` (batches are finished in order) and return the quantized stream's."""
        if self.full_precision is not None:
            self.fp_hidden.append(self.full_precision.output(batch))
        return self.quantized.output(batch)


class _GroupStatistics:
    """The solver's statistics of one group's inputs, added batch by batch; ``name`` (the group's
    first linear) is for errors."""

    def __init__(self, plan: CalibrationPlan, name: str) -> None:
        self.plan, self.name = plan, name
        self.accumulator: StatisticsAccumulator | None = None

    def add(self, inputs: Tensor, fp_inputs: Tensor | None) -> None:
        if self.accumulator is None:
            self.accumulator = self.plan.accumulator(inputs.shape[-1])
        self.accumulator.add(inputs, fp_inputs)

    def result(self) -> LayerStatistics:
        self.plan.ranks.combine(self.accumulator)
        try:
            return self.accumulator.result()
        except NonFiniteStatisticsError as error:
            raise NonFiniteStatisticsError(
                f"{error} at the inputs of {self.name}; the model produced non-finite activations there, nothing was "
                "written"
            ) from None


def _run_block(block: nn.Module, activations: Activations) -> list[Tensor]:
    return [_hidden_of(block(hidden, **kwargs)) for hidden, kwargs in zip(activations.hidden, activations.kwargs)]


def _hidden_of(output: Any) -> Tensor:
    """The hidden states in a block's output (transformers' blocks return a tuple, timm's a tensor)."""
    return output[0] if isinstance(output, tuple) else output


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> list[tuple[nn.Module, torch.device]]:
    """Put every module that is not inside ``blocks`` on ``device``; return how to undo it."""
    moved = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if child is blocks:
                continue
            if any(sub is blocks for sub in child.modules()):
                visit(child)
                continue
            tensors = list(child.parameters()) + list(child.buffers())
            if tensors and tensors[0].device != device and not tensors[0].is_meta:  # meta: not needed, not loaded
                moved.append((child, tensors[0].device))
                child.to(device)

    visit(model)
    return moved
