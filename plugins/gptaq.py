"""GPTAQ (Li et al., ICML 2025): asymmetric calibration, argmin_Q ‖QX − WX̃‖².

The quantized layer sees the quantized-path inputs X but must reproduce the full-precision output on
the full-precision inputs X̃. Neuron decomposition turns the residual ``W(X̃ − X)`` into one extra
compensation term per frozen column (docs/methods.md, GPTAQ §2):
``P = α · triu(dXXT · Uᵀ, 1) · U``, later columns receiving ``w_j · P[j, F]``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from ..core.columns import FROZEN_VALUES, ColumnOptions, asymmetric_term, solve_columns
from ..core.plugin_manager import hookimpl
from ..core.quantizer import Grid
from ..core.solver import LayerResult, Solver
from ..core.statistics import LayerStatistics, Statistic


class GPTAQOptions(ColumnOptions):
    alpha: float = Field(0.25, description="shrinkage of the asymmetric term P (the reference default)")
    cross_block: Literal["released", "exact"] = Field(
        "released",
        description="value of a frozen column that later lazy blocks see in the P term: its quantized value "
        "(the released code) or its compensated value before quantization (the block-free math)",
    )


class GPTAQ(Solver):
    Options = GPTAQOptions
    rows_independent = True

    def statistics(self, options: GPTAQOptions) -> frozenset[Statistic]:
        return frozenset({Statistic.HESSIAN, Statistic.CROSS})

    def solve(self, weight: Tensor, stats: LayerStatistics | None, grid: Grid, options: GPTAQOptions) -> LayerResult:
        if stats is None or stats.cross is None:
            raise ValueError("GPTAQ needs H = XXᵀ and the cross term (X̃ − X)Xᵀ; pass fp_inputs")
        return solve_columns(
            weight,
            stats.hessian,
            grid,
            options,
            terms=lambda problem: [asymmetric_term(stats.cross, problem, options.alpha)],
            frozen_value=FROZEN_VALUES[options.cross_block],
        )


@hookimpl
def compquant_register_solvers(register) -> None:
    register("gptaq", GPTAQ())
