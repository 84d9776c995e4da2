"""Round-to-nearest: the baseline that uses no calibration data."""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.plugin_manager import hookimpl
from ..core.quantizer import Grid
from ..core.solver import LayerResult, Solver, SolverOptions
from ..core.statistics import LayerStatistics, Statistic


def round_to_nearest(weight: Tensor, grid: Grid) -> LayerResult:
    """Each group of columns gets its own grid from its own min/max (or its learned range, on a grid
    that carries them); no compensation."""
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    codes, grids = torch.empty_like(w), []
    g_idx = torch.empty(w.shape[1], dtype=torch.long, device=w.device)
    for index, start in enumerate(grid.group_starts(w.shape[1])):
        columns = slice(start, start + (w.shape[1] if grid.group_size == -1 else grid.group_size))
        params = grid.find_params(w[:, columns], group=index)
        codes[:, columns] = grid.quantize(w[:, columns], params)
        g_idx[columns] = index
        grids.append(params)
    scale = torch.stack([g.scale for g in grids], dim=1)
    zero = torch.stack([g.zero for g in grids], dim=1)
    dequantized = scale[:, g_idx] * (codes - zero[:, g_idx])
    return LayerResult(dequantized.to(weight.dtype), codes.to(torch.int16), scale, zero, g_idx)


class RTN(Solver):
    """Round to nearest on the grid; needs no statistics."""

    rows_independent = True

    def statistics(self, options: SolverOptions) -> frozenset[Statistic]:
        return frozenset()

    def solve(self, weight: Tensor, stats: LayerStatistics | None, grid: Grid, options: SolverOptions) -> LayerResult:
        return round_to_nearest(weight, grid)


@hookimpl
def compquant_register_solvers(register) -> None:
    register("rtn", RTN())
