"""What a solver is: a named object that turns one linear's weight and its calibration statistics
into quantized weights. Plugins subclass `Solver` and register an instance."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from .quantizer import Grid
from .statistics import LayerStatistics, Statistic


class SolverOptions(BaseModel):
    """Base for a solver's own options; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class LayerResult:
    """A quantized linear: ``weight == scale[:, g_idx] * (codes - zero[:, g_idx])``.

    ``weight`` and ``codes`` have the original weight's shape and column order; ``scale`` and ``zero``
    are (rows, groups). ``g_idx[j]`` is the group of input column ``j`` (with act_order and dynamic
    groups, groups are contiguous in the quantization order ``perm``, so g_idx is not monotone).
    """

    weight: Tensor
    codes: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor
    perm: Tensor | None = None


class Solver(ABC):
    """A quantization method for one linear layer at a time."""

    #: The solver's option model; ``options(**values)`` validates what a config gives.
    Options: ClassVar[type[SolverOptions]] = SolverOptions
    #: True when every output row is quantized independently of the others, so that the linears of
    #: a group, which share statistics, can be solved as one stacked matrix (one factorization and
    #: one column loop instead of one per linear). All of compquant's solvers are.
    rows_independent: ClassVar[bool] = False

    def options(self, values: dict[str, Any] | None = None) -> SolverOptions:
        return self.Options(**(values or {}))

    def column_order(self, options: SolverOptions, grid: Grid) -> tuple[bool, bool]:
        """(act_order, groups_in_order) of the records this solver will return with ``options``, for
        checking an export format before the work. The default reads the column machinery's
        options (``act_order``, ``static_groups``); a solver that orders columns otherwise overrides it."""
        act_order = bool(getattr(options, "act_order", False))
        static = bool(getattr(options, "static_groups", False))
        return act_order, not act_order or static or grid.group_size == -1

    @abstractmethod
    def statistics(self, options: SolverOptions) -> frozenset[Statistic]:
        """The statistics the calibration loop must collect for this solver with these options: the
        built-in `Statistic.HESSIAN` and `Statistic.CROSS`, or statistics of the solver's own."""

    @abstractmethod
    def solve(self, weight: Tensor, stats: LayerStatistics | None, grid: Grid, options: SolverOptions) -> LayerResult:
        """Quantize ``weight`` (out, in). ``stats`` is None only when `statistics` asked for nothing.
        The computation runs in the dtype of the statistics (or the weight's, without them)."""
