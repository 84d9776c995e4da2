"""ResComp ("Rethinking Residual Errors in Compensation-based LLM Quantization", ICLR 2026).

At every column step the target is the original full-precision output, not the output of the
already-compensated weights: the residual gains the compensation-aware error ``(w₀_j − w_j) X̃_j``,
absorbed by the later columns through ``R = α₂ · triu(X̃Xᵀ · Uᵀ, 1) · U`` (docs/methods.md, ResComp
§3), on top of either base:

* ``base: gptaq`` (the released code): GPTAQ's P term too, and ``X̃Xᵀ = dXXT + H``;
* ``base: gptq`` (our reading; the authors have not released it): X̃ = X, so no P term and
  ``X̃Xᵀ = H``. Marked experimental.

``mode`` picks the value of a frozen column that later lazy blocks see: ``org`` its quantized value,
``allw`` its compensated value clamped to the grid's range, ``exact`` its compensated value
unclamped (the block-free math). ``auto`` is the release's choice: org at 2 bits, allw above.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor

from ..core.columns import (
    FROZEN_VALUES,
    ColumnOptions,
    CompensationTerm,
    PreparedProblem,
    asymmetric_term,
    least_squares_absorption,
    solve_columns,
)
from ..core.plugin_manager import hookimpl
from ..core.quantizer import Grid
from ..core.solver import LayerResult, Solver
from ..core.statistics import LayerStatistics, Statistic


class ResCompOptions(ColumnOptions):
    base: Literal["gptaq", "gptq"] = Field("gptaq", description="compensation base: GPTAQ (released) or GPTQ")
    alpha: float = Field(0.25, description="GPTAQ's P-term shrinkage (base gptaq only)")
    alpha2: float = Field(0.25, description="shrinkage of the compensation-aware term R")
    mode: Literal["auto", "org", "allw", "exact"] = Field("auto", description="see the module docstring")

    @model_validator(mode="after")
    def _alpha_needs_the_gptaq_base(self) -> ResCompOptions:
        if self.base == "gptq" and "alpha" in self.model_fields_set:
            raise ValueError(
                "alpha scales GPTAQ's P term, which ResComp on base gptq does not have (X̃ = X); "
                "drop alpha or use base: gptaq"
            )
        return self

    def resolved_mode(self, bits: int) -> str:
        return ("org" if bits == 2 else "allw") if self.mode == "auto" else self.mode


def compensation_aware_term(fp_cross_input: Tensor, problem: PreparedProblem, alpha2: float) -> CompensationTerm:
    """ResComp's R term: later columns absorb ``(w₀_j − v_j) · R[j, F]``."""
    original = problem.weight
    matrix = least_squares_absorption(fp_cross_input, problem, alpha2)
    return CompensationTerm(matrix, lambda values, columns: original[:, columns] - values)


class ResComp(Solver):
    Options = ResCompOptions
    rows_independent = True

    def statistics(self, options: ResCompOptions) -> frozenset[Statistic]:
        if options.base == "gptaq":
            return frozenset({Statistic.HESSIAN, Statistic.CROSS})
        return frozenset({Statistic.HESSIAN})

    def solve(self, weight: Tensor, stats: LayerStatistics | None, grid: Grid, options: ResCompOptions) -> LayerResult:
        if stats is None or (options.base == "gptaq" and stats.cross is None):
            raise ValueError(f"ResComp on {options.base} needs {', '.join(sorted(s.name for s in self.statistics(options)))} statistics")
        # X̃Xᵀ from the undamped H, before the dead-column fix, as released
        fp_cross_input = stats.hessian + stats.cross if options.base == "gptaq" else stats.hessian

        def terms(problem: PreparedProblem) -> list[CompensationTerm]:
            extra = [compensation_aware_term(fp_cross_input, problem, options.alpha2)]
            if options.base == "gptaq":
                extra.insert(0, asymmetric_term(stats.cross, problem, options.alpha))
            return extra

        frozen_value = FROZEN_VALUES[options.resolved_mode(grid.bits)]
        return solve_columns(weight, stats.hessian, grid, options, terms=terms, frozen_value=frozen_value)


@hookimpl
def compquant_register_solvers(register) -> None:
    register("rescomp", ResComp())
