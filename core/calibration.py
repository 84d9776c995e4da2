"""The layer-by-layer calibration loop.

The inputs of the first block are caught once; then, block after block, the linears are quantized
group by group in the adapter's true-sequential order (statistics recomputed before each group, so
every group sees the outputs of the already-quantized groups before it), and the calibration
inputs are propagated through the quantized block to become the next block's inputs. Only the
current block sits on the compute device.

When the solver asks for the cross term, a second, full-precision stream runs beside the quantized
one through an unquantized copy of the current block, and ``dXXT`` is accumulated while both
streams run: the full-precision inputs of every linear are never cached.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import ArchitectureAdapter
from .quantizer import Grid
from .report import LayerReport, QuantReport
from .solver import LayerResult, Solver, SolverOptions
from .statistics import LayerStatistics, NonFiniteStatisticsError, Statistic, StatisticsAccumulator
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

    @property
    def wanted(self) -> frozenset[Statistic]:
        return self.solver.statistics(self.options)


def calibrate(
    model: nn.Module,
    plan: CalibrationPlan,
    batches: Sequence[Tensor] | None,
    hook: Any | None = None,
) -> QuantReport:
    """Quantize every linear the adapter names, in place. ``batches`` are the model's calibration
    inputs (token ids for language models); they may be None only for solvers that use no
    statistics. ``hook`` is the plugin manager's hook relay, or None to call no hooks."""
    started = time.perf_counter()
    wanted = plan.wanted
    if wanted and not batches:
        raise ValueError(f"solver {plan.solver_name!r} needs calibration data; none was given")
    report = QuantReport(solver=plan.solver_name)
    blocks = plan.adapter.block_list(model)
    home = next(blocks[0].parameters()).device
    with torch.inference_mode():
        stream = fp_stream = None
        if wanted:
            stream = _catch_block_inputs(model, plan, batches)
            report.calibration_tokens = sum(h.shape[:-1].numel() for h in stream.hidden)
            fp_stream = _Stream(list(stream.hidden), stream.kwargs) if Statistic.CROSS in wanted else None
        for index, block in enumerate(progress(blocks, desc=f"{plan.solver_name} blocks")):
            block.to(plan.device)
            fp_block = copy.deepcopy(block) if fp_stream is not None else None
            prefix = f"{plan.adapter.blocks}.{index}"
            for group in plan.adapter.groups:
                stats = _group_statistics(block, fp_block, group[0], stream, fp_stream, plan, prefix) if wanted else None
                for name in group:
                    layer = block.get_submodule(name)
                    layer_report, result = _quantize_linear(layer, f"{prefix}.{name}", stats, plan)
                    report.layers.append(layer_report)
                    if hook is not None:
                        hook.compquant_after_layer(name=layer_report.name, layer=layer, result=result, report=layer_report)
                del stats
            if stream is not None:
                stream.hidden = _run_block(block, stream)
            if fp_stream is not None:
                fp_stream.hidden = _run_block(fp_block, fp_stream)
            del fp_block
            block.to(home)
            if hook is not None:
                hook.compquant_after_block(index=index, block=block, report=report)
    report.seconds = time.perf_counter() - started
    return report


def _quantize_linear(
    layer: nn.Module, name: str, stats: LayerStatistics | None, plan: CalibrationPlan
) -> tuple[LayerReport, LayerResult]:
    started = time.perf_counter()
    weight = layer.weight.data
    result = plan.solver.solve(weight, stats, plan.grid, plan.options)
    if result.weight.shape != weight.shape or not torch.isfinite(result.weight).all():
        raise ArithmeticError(f"solver {plan.solver_name!r} returned a weight of shape {tuple(result.weight.shape)} "
                              f"with non-finite values for {name}; nothing was written")
    error = relative_output_error(weight, result.weight, stats.hessian) if stats is not None else None
    layer.weight.data.copy_(result.weight)
    seconds = time.perf_counter() - started
    shown = "n/a" if error is None else f"{error:.3e}"
    log.info("%s %s: relative output error %s (%.2fs)", plan.solver_name, name, shown, seconds)
    return LayerReport(name, plan.solver_name, tuple(weight.shape), error, seconds), result


def relative_output_error(weight: Tensor, quantized: Tensor, hessian: Tensor) -> float:
    """‖(W − Q)X‖² / ‖WX‖², computed from H ∝ XXᵀ."""
    w = weight.to(hessian.dtype)
    delta = w - quantized.to(hessian.dtype)
    reference = torch.sum((w @ hessian) * w)
    return float(torch.sum((delta @ hessian) * delta) / reference) if reference > 0 else 0.0


def _catch_block_inputs(model: nn.Module, plan: CalibrationPlan, batches: Sequence[Tensor]) -> _Stream:
    """Run the model on each batch up to the first block and keep what the block would receive."""
    blocks = plan.adapter.block_list(model)
    stream = _Stream([], [])

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stream.hidden.append(args[0])
        stream.kwargs.append(kwargs)
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
    return stream


def _group_statistics(
    block: nn.Module,
    fp_block: nn.Module | None,
    first: str,
    stream: _Stream,
    fp_stream: _Stream | None,
    plan: CalibrationPlan,
    prefix: str,
) -> LayerStatistics:
    accumulator: StatisticsAccumulator | None = None
    for index, hidden in enumerate(stream.hidden):
        inputs = _input_of(block, first, hidden, stream.kwargs[index])
        fp_inputs = None
        if fp_block is not None and fp_stream is not None:
            fp_inputs = _input_of(fp_block, first, fp_stream.hidden[index], fp_stream.kwargs[index])
        if accumulator is None:
            accumulator = StatisticsAccumulator(inputs.shape[-1], plan.wanted, dtype=plan.stats_dtype, device=plan.device)
        accumulator.add(inputs, fp_inputs)
    try:
        return accumulator.result()
    except NonFiniteStatisticsError as error:
        raise NonFiniteStatisticsError(
            f"{error} at the inputs of {prefix}.{first}; the model produced non-finite activations there, "
            "nothing was written"
        ) from None


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
            if tensors and tensors[0].device != device:
                moved.append((child, tensors[0].device))
                child.to(device)

    visit(model)
    return moved
