"""The layer-by-layer calibration loop.

The inputs of the first block are caught once; then, block after block, the linears are quantized
group by group in the adapter's true-sequential order (statistics recomputed before each group, so
every group sees the outputs of the already-quantized groups before it), and the calibration
inputs are propagated through the quantized block to become the next block's inputs. Only the
current block sits on the compute device.

When a statistic the solver asks for needs the full-precision inputs (the cross term ``dXXT`` does),
a second, full-precision stream runs beside the quantized one, and the statistics are accumulated
while both streams run. The full-precision inputs each group of the current block needs are either
recomputed per group through an unquantized copy of the block (``stream``: memory of one block
copy) or captured in one pass of the still-unquantized block before its first group is solved
(``cache``: one forward instead of one per group, memory of tokens × the group input widths of one
block). ``auto`` caches when that fits ``fp_cache_mib``. Nothing is kept
beyond the current block.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .adapter import ArchitectureAdapter
from .block_store import ResidentBlocks, StreamedBlocks
from .checkpoint import BlockCheckpoint
from .memory import return_freed_memory
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
class _Stream:
    """Hidden states entering the current block, one tensor per calibration batch, with the
    keyword arguments the model passed to the block for that batch."""

    hidden: list[Tensor]
    kwargs: list[dict[str, Any]]


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
    checkpoint: BlockCheckpoint | None = None,
    store: ResidentBlocks | StreamedBlocks | None = None,
) -> QuantReport:
    """Quantize every linear the adapter names, in place. ``batches`` are the model's calibration
    inputs (token ids for language models); they may be None only for solvers that use no
    statistics. ``hook`` is the plugin manager's hook relay, or None to call no hooks. With a
    ``checkpoint``, blocks it records as finished are reloaded instead of quantized again, and
    every newly finished block is recorded in it. ``store`` says where blocks come from and go to
    (default: they are in memory; see `compquant.core.block_store`)."""
    started = time.perf_counter()
    wanted = plan.wanted
    if wanted and not batches:
        raise ValueError(f"solver {plan.solver_name!r} needs calibration data; none was given")
    report = QuantReport(solver=plan.solver_name)
    blocks = plan.adapter.block_list(model)
    store = store or ResidentBlocks(plan.device)
    with torch.inference_mode():
        stream = fp_stream = None
        store.prepare_outside(model, blocks)
        if wanted:
            stream, block_kwargs = _catch_block_inputs(model, plan, batches)
            report.calibration_tokens = sum(h.shape[:-1].numel() for h in stream.hidden)
            fp_stream = _Stream(list(stream.hidden), stream.kwargs) if plan.needs_fp_inputs else None
        store.release_outside(model, blocks)
        start = _resume(checkpoint, blocks, plan, report, stream, fp_stream) if checkpoint is not None else 0
        for index in progress(range(start, len(blocks)), desc=f"{plan.solver_name} blocks", initial=start,
                              total=len(blocks)):
            block = blocks[index]
            prefix = f"{plan.adapter.blocks}.{index}"
            store.load(prefix, block)
            if stream is not None:
                stream.kwargs = block_kwargs[index]
                if fp_stream is not None:
                    fp_stream.kwargs = block_kwargs[index]
            full_precision = _FullPrecisionInputs(block, plan, fp_stream) if fp_stream is not None else None
            finished = len(report.layers)
            block_stats = None
            if wanted and plan.sequential == "blocks":
                block_stats = _block_statistics(block, stream, full_precision, plan, prefix)
            for group_index, group in enumerate(plan.adapter.groups):
                stats = None
                if block_stats is not None:
                    stats, block_stats[group_index] = block_stats[group_index], None
                elif wanted:
                    stats = _group_statistics(block, group_index, stream, full_precision, plan, prefix)
                layers = [(f"{prefix}.{name}", block.get_submodule(name)) for name in group]
                for (_, layer), (layer_report, result) in zip(layers, _quantize_group(layers, stats, plan)):
                    report.layers.append(layer_report)
                    report.records[layer_report.name] = QuantizedLinear.from_result(result, plan.grid)
                    if hook is not None:
                        hook.compquant_after_layer(name=layer_report.name, layer=layer, result=result,
                                                   layer_report=layer_report, report=report)
                del stats
            if stream is not None:
                stream.hidden = _run_block(block, stream)
                _check_finite(stream.hidden, prefix)
            if full_precision is not None:
                fp_stream.hidden = full_precision.next_hidden()
            del full_precision
            done = report.layers[finished:]
            records = {layer.name: report.records[layer.name] for layer in done}
            if checkpoint is not None:
                checkpoint.save_block(index, block, records, done,
                                      stream.hidden if stream else None, fp_stream.hidden if fp_stream else None)
            if hook is not None:
                hook.compquant_after_block(index=index, block=block, report=report)
            report.records.update(store.release(prefix, block, records))
            return_freed_memory()
    report.seconds = time.perf_counter() - started
    return report


def _resume(
    checkpoint: BlockCheckpoint,
    blocks: Sequence[nn.Module],
    plan: CalibrationPlan,
    report: QuantReport,
    stream: _Stream | None,
    fp_stream: _Stream | None,
) -> int:
    """Reload the finished blocks recorded in ``checkpoint``; return the first block left to do."""
    resumed, records, layers = checkpoint.restore(blocks, plan.adapter.blocks, plan.grid)
    report.records.update(records)
    report.layers.extend(layers)
    if resumed.blocks_done and stream is not None:
        stream.hidden = [h.to(plan.device) for h in resumed.hidden]
        if fp_stream is not None:
            fp_stream.hidden = [h.to(plan.device) for h in resumed.fp_hidden]
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
    if plan.solver.rows_independent and len(weights) > 1:
        stacked = plan.solver.solve(torch.cat(weights), stats, plan.grid, plan.options)
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


def _catch_block_inputs(model: nn.Module, plan: CalibrationPlan, batches: Sequence[Tensor]) -> tuple[_Stream, list[list[dict]]]:
    """Run the model on each batch with every block standing in for the identity, and keep what the
    first block receives and the keyword arguments the model passes to each block: they differ
    between blocks where layers differ in kind (Gemma 3's sliding-window and global layers get their
    own attention masks and rotary embeddings)."""
    blocks = plan.adapter.block_list(model)
    stream = _Stream([], [])
    block_kwargs: list[list[dict[str, Any]]] = [[] for _ in blocks]

    def record(index: int):
        def forward(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if index == 0:
                stream.hidden.append(hidden)
            block_kwargs[index].append(kwargs)
            if index == len(blocks) - 1:
                raise _Caught
            return hidden

        return forward

    moved = _move_outside_blocks(model, blocks, plan.device)
    for index, block in enumerate(blocks):
        block.forward = record(index)
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
    stream.kwargs = block_kwargs[0]
    return stream, block_kwargs


class _FullPrecisionInputs:
    """The full-precision inputs of every group of the current block, and the block's full-precision
    outputs, computed from the full-precision stream while the block is still unquantized."""

    def __init__(self, block: nn.Module, plan: CalibrationPlan, fp_stream: _Stream) -> None:
        self.firsts = [group[0] for group in plan.adapter.groups]
        self.stream = fp_stream
        widths = sum(block.get_submodule(name).in_features for name in self.firsts)
        example = fp_stream.hidden[0]
        size = sum(h.shape[:-1].numel() for h in fp_stream.hidden) * widths * example.element_size()
        cache = plan.fp_inputs == "cache" or (plan.fp_inputs == "auto" and size <= plan.fp_cache_bytes)
        log.debug("full-precision inputs: %s (%.0f MiB if cached)", "cached" if cache else "streamed", size / 2**20)
        self.copy: nn.Module | None = None if cache else copy.deepcopy(block)
        self.cached: list[list[Tensor]] | None = None
        self.outputs: list[Tensor] | None = None
        if cache:
            self.cached, self.outputs = _capture_group_inputs(block, self.firsts, fp_stream)

    def inputs(self, group_index: int, batch_index: int) -> Tensor:
        if self.cached is not None:
            return self.cached[group_index][batch_index]
        hidden, kwargs = self.stream.hidden[batch_index], self.stream.kwargs[batch_index]
        return _input_of(self.copy, self.firsts[group_index], hidden, kwargs)

    def release(self, group_index: int) -> None:
        """The group's statistics are complete: its cached inputs are no longer needed."""
        if self.cached is not None:
            self.cached[group_index] = []

    def next_hidden(self) -> list[Tensor]:
        return self.outputs if self.outputs is not None else _run_block(self.copy, self.stream)


def _capture_group_inputs(block: nn.Module, firsts: list[str], stream: _Stream) -> tuple[list[list[Tensor]], list[Tensor]]:
    """One full pass of ``block`` per batch, keeping each named linear's input and the block output."""
    captured: list[list[Tensor]] = [[] for _ in firsts]
    handles = [
        block.get_submodule(name).register_forward_pre_hook(lambda module, args, i=i: captured[i].append(args[0]))
        for i, name in enumerate(firsts)
    ]
    try:
        outputs = _run_block(block, stream)
    finally:
        for handle in handles:
            handle.remove()
    return captured, outputs


def _block_statistics(
    block: nn.Module, stream: _Stream, full_precision: _FullPrecisionInputs | None, plan: CalibrationPlan, prefix: str
) -> list[LayerStatistics | None]:
    """Every group's statistics from one pass of the block as it is (``sequential: blocks``)."""
    firsts = [group[0] for group in plan.adapter.groups]
    accumulators: list[StatisticsAccumulator | None] = [None] * len(firsts)
    batch_index = 0

    def accumulate(group_index: int, inputs: Tensor) -> None:
        if accumulators[group_index] is None:
            accumulators[group_index] = plan.accumulator(inputs.shape[-1])
        fp_inputs = full_precision.inputs(group_index, batch_index) if full_precision is not None else None
        accumulators[group_index].add(inputs, fp_inputs)

    handles = [block.get_submodule(name).register_forward_pre_hook(lambda module, args, i=i: accumulate(i, args[0]))
               for i, name in enumerate(firsts)]
    try:
        for batch_index, (hidden, kwargs) in enumerate(zip(stream.hidden, stream.kwargs)):
            block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if full_precision is not None:
        for group_index in range(len(firsts)):
            full_precision.release(group_index)
    return [_finished(accumulator, f"{prefix}.{name}") for accumulator, name in zip(accumulators, firsts)]


def _finished(accumulator: StatisticsAccumulator | None, name: str) -> LayerStatistics:
    if accumulator is None:
        raise RuntimeError(f"{name} was not called when its block ran; the adapter's groups do not match the model")
    try:
        return accumulator.result()
    except NonFiniteStatisticsError as error:
        raise NonFiniteStatisticsError(
            f"{error} at the inputs of {name}; the model produced non-finite activations there, nothing was written"
        ) from None


def _group_statistics(
    block: nn.Module,
    group_index: int,
    stream: _Stream,
    full_precision: _FullPrecisionInputs | None,
    plan: CalibrationPlan,
    prefix: str,
) -> LayerStatistics:
    first = plan.adapter.groups[group_index][0]
    accumulator: StatisticsAccumulator | None = None
    for index, hidden in enumerate(stream.hidden):
        inputs = _input_of(block, first, hidden, stream.kwargs[index])
        fp_inputs = full_precision.inputs(group_index, index) if full_precision is not None else None
        if accumulator is None:
            accumulator = plan.accumulator(inputs.shape[-1])
        accumulator.add(inputs, fp_inputs)
    if full_precision is not None:
        full_precision.release(group_index)
    return _finished(accumulator, f"{prefix}.{first}")


def _input_of(block: nn.Module, name: str, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """The input ``block.<name>`` receives (after any attached input ops), running the block only
    as far as needed."""
    seen: list[Tensor] = []

    def catch(module: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Caught

    handle = block.get_submodule(name).register_forward_pre_hook(catch)
    try:
        block(hidden, **kwargs)
    except _Caught:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{name} was not called when its block ran; the adapter's groups do not match the model")
    return seen[0]


def _run_block(block: nn.Module, stream: _Stream) -> list[Tensor]:
    outputs = []
    for hidden, kwargs in zip(stream.hidden, stream.kwargs):
        out = block(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


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
