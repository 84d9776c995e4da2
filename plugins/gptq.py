"""GPTQ (Frantar et al., 2023): OBS column updates against H = XXᵀ of the quantized-path inputs."""
from __future__ import annotations

from torch import Tensor

from ..core.columns import ColumnOptions, solve_columns
from ..core.plugin_manager import hookimpl
from ..core.quantizer import Grid
from ..core.solver import LayerResult, Solver
from ..core.statistics import LayerStatistics, Statistic


class GPTQ(Solver):
    """argmin_Q ‖WX − QX‖², one column at a time, the rest compensating (docs/methods.md, GPTQ §1)."""

    Options = ColumnOptions
    rows_independent = True

    def statistics(self, options: ColumnOptions) -> frozenset[Statistic]:
        return frozenset({Statistic.HESSIAN})

    def solve(self, weight: Tensor, stats: LayerStatistics | None, grid: Grid, options: ColumnOptions) -> LayerResult:
        if stats is None:
            raise ValueError("GPTQ needs the Hessian H = XXᵀ of the layer's calibration inputs")
        return solve_columns(weight, stats.hessian, grid, options)


@hookimpl
def compquant_register_solvers(register) -> None:
    register("gptq", GPTQ())
