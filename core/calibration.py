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

Routed linears (a mixture-of-experts expert's, `compquant.core.routing`): the forwards run with
routed modules feeding every token to each expert under a mask of the tokens its router chose; a
group's statistics are of the masked rows (X̃ at the same rows), and a group with too few of them
falls back (``routed_fallback``), logged and recorded in its `LayerReport`.

With a learner (`compquant.core.learner`, docs/learners.md), the full-precision stream always runs:
each block is first trained towards its full-precision outputs, then its groups are quantized as
above on the learned weights and, where it learned them, on the learned grid ranges.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .adapter import ArchitectureAdapter, hidden_states, run_block
from .block_store import ResidentBlocks, StreamedBlocks
from .checkpoint import BlockCheckpoint
from .distributed import Ranks, SharedCheckpoint
from .errors import NonFiniteError
from .finite import describe, non_finite
from .learner import BlockLearning
from .memory import return_freed_memory
from .paused_forward import PausedForward
from .qlinear import QuantizedLinear
from .quantizer import Grid, GroupRanges
from .report import BlockReport, LayerReport, QuantReport
from .routing import ALL_TOKENS, RoutedTokens, every_token, routed_mask
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
    needs X̃ or a learner its targets), and the keyword arguments (masks, positions) the model
    passes this block per batch."""

    hidden: list[Tensor]
    kwargs: list[dict[str, Any]]
    fp_hidden: list[Tensor] | None = None


LayerDone = Callable[[nn.Module, LayerReport, LayerResult], None]
"""Called with each linear, its report and the solver's result once its quantized weight is in place."""
Learn = Callable[[], Mapping[str, GroupRanges]]
"""Trains a block before its first group is quantized (a learner): changes the block's weights in
place and returns the learned grid ranges, by linear path inside the block."""


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
    learning: BlockLearning | None = None
    """The learner trained on every block before its linears are quantized, or None."""
    routed_min_tokens: int | None = None
    """A routed group (an expert) with fewer routed tokens falls back; None: its input width."""
    routed_fallback: str = ALL_TOKENS
    """``all-tokens``, or the name of ``fallback_solver``, a solver that needs no statistics."""
    fallback_solver: Solver | None = None

    def __post_init__(self) -> None:
        if (self.routed_fallback == ALL_TOKENS) != (self.fallback_solver is None):
            raise ValueError(f"routed_fallback {self.routed_fallback!r} needs fallback_solver to be that solver "
                             f"(None only for {ALL_TOKENS!r})")
    ranks: Ranks = Ranks()
    """The processes the run is spread over (`compquant.core.distributed`); one by default."""

    @property
    def wanted(self) -> frozenset[Statistic]:
        return self.solver.statistics(self.options)

    @property
    def uses_data(self) -> bool:
        """Whether the loop runs the calibration inputs at all: for the solver's statistics or a learner."""
        return bool(self.wanted) or self.learning is not None

    @property
    def needs_fp_inputs(self) -> bool:
        """Whether the statistics take the full-precision stream."""
        return needs_fp_inputs(self.wanted)

    @property
    def keeps_fp_stream(self) -> bool:
        """Whether the full-precision stream is carried from block to block: for the statistics, or
        for a learner's targets."""
        return self.needs_fp_inputs or self.learning is not None

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
    """Quantize every linear the adapter names, in place, after the plan's learner (if any) trained
    each block. ``batches`` are the model's calibration inputs (token ids for language models); they
    may be None only for solvers that use no statistics and no learner. ``hook`` is the plugin
    manager's hook relay, or None to call no hooks. With a ``checkpoint``, blocks it records as
    finished are reloaded instead of quantized again, and every newly finished block is recorded in
    it. ``store`` says where blocks come from and go to
    (default: they are in memory; see `compquant.core.block_store`)."""
    started = time.perf_counter()
    if plan.uses_data and not batches:
        needs = f"learner {plan.learning.name!r}" if plan.learning is not None else f"solver {plan.solver_name!r}"
        raise ValueError(f"{needs} needs calibration data; none was given")
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
        if plan.uses_data:
            activations, block_kwargs = _catch_block_inputs(model, plan, batches)
            report.calibration_tokens = plan.ranks.total(sum(h.shape[:-1].numel() for h in activations.hidden))
        store.release_outside(model, blocks)
        start = _resume(checkpoint, blocks, plan, report, activations) if checkpoint is not None else 0
        method = plan.solver_name if plan.learning is None else f"{plan.learning.name}+{plan.solver_name}"
        for index in progress(range(start, len(blocks)), desc=f"{method} blocks", initial=start, total=len(blocks)):
            block = blocks[index]
            prefix = f"{plan.adapter.blocks}.{index}"
            store.load(prefix, block)
            if activations is not None:
                activations.kwargs = block_kwargs[index]
            first = len(report.layers)
            learned = None
            if plan.learning is not None:
                learned = _Learned(plan, index, blocks, activations, block_kwargs, store)
            activations = quantize_block(block, activations, plan, prefix, finished, learned)
            if learned is not None:  # the full-precision block's outputs enter the next block's targets
                activations.fp_hidden = learned.targets
                report.blocks.append(learned.report)
            done = report.layers[first:]
            records = {layer.name: report.records[layer.name] for layer in done}
            if checkpoint is not None:
                checkpoint.save_block(index, block, records, done, None if activations is None else activations.hidden,
                                      None if activations is None else activations.fp_hidden,
                                      None if learned is None else learned.report)
            if hook is not None:
                hook.compquant_after_block(index=index, block=block, report=report)
            report.records.update(store.release(prefix, block, records))
            return_freed_memory()
    report.seconds = time.perf_counter() - started
    return report


def quantize_block(
    block: nn.Module,
    inputs: Activations | None,
    plan: CalibrationPlan,
    prefix: str,
    finished: LayerDone,
    learn: Learn | None = None,
) -> Activations | None:
    """Quantize the adapter's linears of ``block`` in place, group by group, calibrated on
    ``inputs``, and return the activations the quantized block hands on (docs/methods.md §4).
    ``prefix`` is the block's path in the model, for reports and errors; ``finished`` is called with
    each linear as soon as its quantized weight is in place. ``inputs`` is None only for a solver
    that uses no statistics: then nothing runs and None is returned. ``learn`` (a learner) runs once
    the full-precision stream has what it needs of the unchanged block and before any group is
    quantized; its ranges are the grids of the linears it names.

    This is the loop's unit of work: it needs nothing but its arguments and keeps nothing. An
    exception (a solver's error, non-finite values, an interrupt) leaves no forward paused."""
    groups = plan.adapter.for_block(block).groups  # the one place the loop reads the adapter's groups
    if inputs is None:
        for group in groups:
            _solve(block, group, None, plan, prefix, finished, {})
        return None
    batches = range(len(inputs.hidden))
    with contextlib.ExitStack() as running:
        running.enter_context(every_token())  # routed modules feed every token, under masks (core/routing.py)
        full_precision = _full_precision(block, groups, inputs, plan, prefix, running)  # before anything is quantized
        ranges = learn() if learn is not None else {}
        streams = _Streams(running.enter_context(_PausedStream(block, groups, inputs.hidden, inputs.kwargs, prefix)),
                           full_precision)
        if plan.sequential == "groups":
            for index, group in enumerate(groups):
                statistics = _GroupStatistics(plan, f"{prefix}.{group[0]}", hold_rows=True)
                for batch in batches:
                    statistics.add(*streams.inputs(index, batch))
                stats, routed = statistics.result()
                _solve(block, group, stats, plan, prefix, finished, ranges, routed)
            hidden = [streams.finish(batch) for batch in batches]
        else:
            collected = [_GroupStatistics(plan, f"{prefix}.{group[0]}") for group in groups]
            for batch in batches:  # nothing is quantized during this pass, so one batch at a time
                for index, statistics in enumerate(collected):
                    statistics.add(*streams.inputs(index, batch))
                streams.finish(batch)  # the unquantized block's output: not handed on
            for group, statistics in zip(groups, collected):
                stats, routed = statistics.result()
                _solve(block, group, stats, plan, prefix, finished, ranges, routed)
    if plan.sequential == "blocks":  # outside every_token: routed modules route as at inference
        hidden = run_block(block, inputs.hidden, inputs.kwargs)
    _check_finite(hidden, prefix)
    return Activations(hidden, inputs.kwargs, streams.fp_hidden)


def _solve(block: nn.Module, group: Sequence[str], stats: LayerStatistics | None, plan: CalibrationPlan, prefix: str,
           finished: LayerDone, ranges: Mapping[str, GroupRanges], routed: RoutedTokens | None = None) -> None:
    """Quantize ``group`` from ``stats``, on the learned grid ranges where a learner left them. For a
    routed group (``routed``) the reports carry its token count and any fallback; one that fell back
    to a solver of its own is quantized by that solver."""
    if routed is not None and routed.fallback not in (None, ALL_TOKENS):
        solver = plan.fallback_solver
        plan = dataclasses.replace(plan, solver=solver, solver_name=routed.fallback, options=solver.options({}))
        stats = None
    layers = [(f"{prefix}.{name}", block.get_submodule(name)) for name in group]
    learned = [ranges.get(name) for name in group]
    for (_, layer), (layer_report, result) in zip(layers, _quantize_group(layers, stats, plan, learned)):
        if routed is not None:
            layer_report = dataclasses.replace(layer_report, routed_tokens=routed.routed, fallback=routed.fallback)
        finished(layer, layer_report, result)


class _Learned:
    """The plan's learner on block ``index``, as `quantize_block`'s ``learn``: called, it trains the
    block (`BlockLearning.run`) and returns the learned ranges; afterwards ``targets`` holds the
    full-precision block's outputs (the next block's full-precision inputs) and ``report`` how the
    training went."""

    def __init__(self, plan: CalibrationPlan, index: int, blocks: Sequence[nn.Module], inputs: Activations,
                 block_kwargs: Sequence[Sequence[dict[str, Any]]], store: ResidentBlocks | StreamedBlocks) -> None:
        self.plan, self.index, self.blocks, self.inputs, self.store = plan, index, blocks, inputs, store
        self.block_kwargs = block_kwargs
        self.targets: list[Tensor] = []
        self.report: BlockReport | None = None

    def __call__(self) -> Mapping[str, GroupRanges]:
        plan, inputs = self.plan, self.inputs
        learned, self.targets, self.report = plan.learning.run(
            self.index, self.blocks, plan.adapter, inputs.hidden, self.block_kwargs, inputs.fp_hidden, plan.grid,
            self.store)
        return learned.ranges


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
    report.blocks.extend(resumed.learning)
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
    layers: list[tuple[str, nn.Module]],
    stats: LayerStatistics | None,
    plan: CalibrationPlan,
    ranges: Sequence[GroupRanges | None],
) -> list[tuple[LayerReport, LayerResult]]:
    """Quantize the linears of one group, which share ``stats``, on the plan's grid or on each
    linear's learned ``ranges`` (None: its grids from its own weights). A solver whose rows are
    independent solves them stacked: one factorization and one column loop for the whole group."""
    started = time.perf_counter()
    weights = [layer.weight.data for _, layer in layers]
    found = non_finite((f"{name}.weight", weight) for (name, _), weight in zip(layers, weights))
    if found:  # the solver's input is broken, not the solver
        raise NonFiniteError(f"NaN or Inf in {describe(found)} before quantization (the solver's input); nothing was "
                             "written. The model was broken before this layer: check it in full precision (compquant eval)")
    learned = [r is not None for r in ranges]
    stacked = None
    if plan.solver.rows_independent and not any(learned) and (len(weights) > 1 or plan.ranks.world > 1):
        stacked = plan.ranks.solve_rows(plan.solver, torch.cat(weights), stats, plan.grid, plan.options)
    elif plan.solver.rows_independent and all(learned) and len(weights) > 1:  # learners run on one process
        grid = plan.grid.with_ranges(GroupRanges.stacked(ranges))
        stacked = plan.solver.solve(torch.cat(weights), stats, grid, plan.options)
    if stacked is not None:
        results = _split_rows(stacked, [weight.shape[0] for weight in weights])
    else:
        results = [plan.solver.solve(weight, stats, plan.grid.with_ranges(r), plan.options)
                   for weight, r in zip(weights, ranges)]
    seconds = (time.perf_counter() - started) / sum(weight.shape[0] for weight in weights)
    done = []
    for (name, layer), weight, result in zip(layers, weights, results):
        if result.weight.shape != weight.shape or not torch.isfinite(result.weight).all():
            raise ArithmeticError(f"solver {plan.solver_name!r} returned a weight of shape {tuple(result.weight.shape)} "
                                  f"with non-finite values for {name}; nothing was written")
        error = None if stats is None or stats.hessian is None else relative_output_error(weight, result.weight, stats.hessian)
        layer.weight.data.copy_(result.weight)
        log.info("%s %s: relative output error %s", plan.solver_name, name, "n/a" if error is None else f"{error:.3e}")
        report = LayerReport(name, plan.solver_name, tuple(weight.shape), error, seconds * weight.shape[0],
                             None if stats is None else stats.tokens)
        done.append((report, result))
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


def _catch_block_inputs(model: nn.Module, plan: CalibrationPlan,
                        batches: Sequence[Tensor]) -> tuple[Activations, list[list[dict[str, Any]]]]:
    """Run the model on each batch with every block standing in for the identity, and keep what the
    first block receives (twice over, as the full-precision stream too, when a statistic needs X̃)
    and the keyword arguments the model passes to each block, per batch: they differ between blocks
    where layers differ in kind (Gemma 3's sliding-window and global layers get their own attention
    masks and rotary embeddings). No block computes anything here."""
    blocks = plan.adapter.block_list(model)
    caught = Activations([], [])
    block_kwargs: list[list[dict[str, Any]]] = [[] for _ in blocks]

    def stand_in(index: int) -> Callable[..., Tensor]:
        def forward(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if index == 0:
                caught.hidden.append(hidden)
            block_kwargs[index].append(kwargs)
            if index == len(blocks) - 1:
                raise _Caught
            return hidden

        return forward

    moved = _move_outside_blocks(model, blocks, plan.device)
    for index, block in enumerate(blocks):
        block.forward = stand_in(index)
    try:
        for batch in batches:
            try:
                plan.adapter.run(model, batch.to(plan.device))
            except _Caught:
                pass
    finally:
        for block in blocks:
            del block.forward
        for module, device in moved:
            module.to(device)
    caught.kwargs = block_kwargs[0]
    if plan.keeps_fp_stream:
        caught.fp_hidden = list(caught.hidden)
    return caught, block_kwargs


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

    def inputs(self, group: int, batch: int) -> tuple[Tensor, Tensor | None]:
        """What group ``group``'s linears receive in batch ``batch``, and the mask of the rows routed to
        them (None when no router chose among them): the batch's forward goes on (through the groups
        before, as they now are) to the group's first linear, and waits there."""
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
        return stop.args[0], routed_mask(stop.context)

    def output(self, batch: int) -> Tensor:
        """The block's output for batch ``batch``, whose forward has passed every group: it runs to the end."""
        forward, self.forwards[batch] = self.forwards[batch], None
        assert forward.advance() is None, "every group has been passed, so the forward cannot stop again"
        return hidden_states(forward.output)


class _CachedStream:
    """The full-precision inputs of every group and the block's outputs, kept from one pass per batch
    of the still unquantized block (``fp_inputs: cache``); each is handed out once, then dropped."""

    def __init__(self, block: nn.Module, groups: Sequence[Sequence[str]], hidden: Sequence[Tensor],
                 kwargs: Sequence[dict[str, Any]], prefix: str) -> None:
        self.inputs_of: list[list[tuple[Tensor, Tensor | None] | None]] = []
        self.outputs: list[Tensor | None] = []
        with _PausedStream(block, groups, hidden, kwargs, prefix) as stream:
            for batch in range(len(hidden)):
                self.inputs_of.append([stream.inputs(group, batch) for group in range(len(groups))])
                self.outputs.append(stream.output(batch))

    def inputs(self, group: int, batch: int) -> tuple[Tensor, Tensor | None]:
        inputs, self.inputs_of[batch][group] = self.inputs_of[batch][group], None
        return inputs

    def output(self, batch: int) -> Tensor:
        output, self.outputs[batch] = self.outputs[batch], None
        return output


def _full_precision(block: nn.Module, groups: Sequence[Sequence[str]], inputs: Activations, plan: CalibrationPlan,
                    prefix: str, running: contextlib.ExitStack) -> _PausedStream | _CachedStream | None:
    """Where this block's X̃ comes from (``fp_inputs``, see the module docstring), or None when no
    statistic needs it. A paused copy is closed with ``running``."""
    if inputs.fp_hidden is None or not plan.needs_fp_inputs:
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

    def inputs(self, group: int, batch: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """X and X̃ (or None) of group ``group`` in batch ``batch``, and the quantized stream's mask of
        routed rows (or None). X̃ is of every row, so that this one mask picks the same tokens of both."""
        fp_inputs = None if self.full_precision is None else self.full_precision.inputs(group, batch)[0]
        inputs, mask = self.quantized.inputs(group, batch)
        return inputs, fp_inputs, mask

    def finish(self, batch: int) -> Tensor:
        """Run batch ``batch`` to the block's end in both streams; keep the full-precision output in
        ``fp_hidden`` (batches are finished in order) and return the quantized stream's."""
        if self.full_precision is not None:
            self.fp_hidden.append(self.full_precision.output(batch))
        return self.quantized.output(batch)


class _GroupStatistics:
    """The solver's statistics of one group's inputs, added batch by batch; ``name`` (the group's
    first linear) is for errors and the fallback's warning.

    Inputs that come with a mask of routed rows (core/routing.py) add only those rows. With the
    ``all-tokens`` fallback every row is what a group with too few routed tokens is quantized from:
    with ``hold_rows`` (one group at a time, every batch's forward paused in front of it, so that
    its inputs are alive anyway) they are held and accumulated only for a group that falls back;
    otherwise (``sequential: blocks``, one batch after another) they are accumulated as they come."""

    def __init__(self, plan: CalibrationPlan, name: str, hold_rows: bool = False) -> None:
        self.plan, self.name, self.hold_rows = plan, name, hold_rows
        self.accumulator: StatisticsAccumulator | None = None
        self.every_row: StatisticsAccumulator | None = None
        self.held: list[tuple[Tensor, Tensor | None]] = []
        self.routed = False
        self.columns = 0

    def add(self, inputs: Tensor, fp_inputs: Tensor | None, mask: Tensor | None = None) -> None:
        if not self.plan.wanted:  # a solver without statistics after a learner: the batches only pass by
            return
        if self.accumulator is None:
            self.accumulator = self.plan.accumulator(inputs.shape[-1])
            self.columns = inputs.shape[-1]
        if mask is None:
            self.accumulator.add(inputs, fp_inputs)
            return
        self.routed = True
        rows = inputs.reshape(-1, self.columns)
        fp_rows = None if fp_inputs is None else fp_inputs.reshape(-1, self.columns)
        if mask.shape != rows.shape[:1]:
            raise RuntimeError(f"{self.name} received {rows.shape[0]} rows under a routing mask of shape "
                               f"{tuple(mask.shape)}; a routing module must mask the rows its submodule receives")
        if self.plan.routed_fallback == ALL_TOKENS and self.hold_rows:
            self.held.append((rows, fp_rows))
        elif self.plan.routed_fallback == ALL_TOKENS:
            self._add_every_row(rows, fp_rows)
        if mask.any():  # a batch may route nothing here
            self.accumulator.add(rows[mask], None if fp_rows is None else fp_rows[mask])

    def result(self) -> tuple[LayerStatistics | None, RoutedTokens | None]:
        """The statistics to quantize the group from, and for a routed group its token count and any
        fallback (the statistics are then every row's, or None for a fallback solver). Both are None
        when the solver asked for no statistics."""
        if not self.plan.wanted:
            return None, None
        self.plan.ranks.combine(self.accumulator)  # every rank's tokens: the same decision on every rank
        if not self.routed:
            return self._finished(self.accumulator), None
        needed = self.plan.routed_min_tokens or self.columns
        held, self.held = self.held, []
        if self.accumulator.tokens >= needed:
            return self._finished(self.accumulator), RoutedTokens(self.accumulator.tokens)
        for rows, fp_rows in held:  # in batch order, as if accumulated while they came
            self._add_every_row(rows, fp_rows)
        if self.every_row is not None:
            self.plan.ranks.combine(self.every_row)
        routed = RoutedTokens(self.accumulator.tokens, self.plan.routed_fallback)
        log.warning("%s received %d routed calibration tokens, fewer than %d (calibration.expert_min_tokens, by default "
                    "the input width): quantized %s (calibration.expert_fallback: %s)", self.name, routed.routed, needed,
                    "from all the block's tokens as if routed to it" if routed.fallback == ALL_TOKENS
                    else f"by {routed.fallback}, which needs no statistics", routed.fallback)
        return (self._finished(self.every_row) if routed.fallback == ALL_TOKENS else None), routed

    def _add_every_row(self, rows: Tensor, fp_rows: Tensor | None) -> None:
        if self.every_row is None:
            self.every_row = self.plan.accumulator(self.columns)
        self.every_row.add(rows, fp_rows)

    def _finished(self, accumulator: StatisticsAccumulator) -> LayerStatistics:
        try:
            return accumulator.result()
        except NonFiniteStatisticsError as error:
            raise NonFiniteStatisticsError(
                f"{error} at the inputs of {self.name}; the model produced non-finite activations there, nothing was "
                "written"
            ) from None


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
