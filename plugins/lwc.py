"""OmniQuant's learnable weight clipping, LWC (docs/learners.md §1): the baseline learner of the
learned family. Each linear keeps its weight; per row and group it learns how far in from the
weights' own min and max its grid's interval reaches."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.learner import GradientLearner, LearnerOptions, LinearParametrization, trainable
from ..core.plugin_manager import hookimpl
from ..core.quantizer import Grid, GroupRanges

#: γ and β at the start: sigmoid(4) ≈ 0.982, almost no clipping (OmniQuant's initialisation).
INITIAL_LOGIT = 4.0


class LearnedClipping(LinearParametrization):
    """One linear's weight, fixed, and LWC's factors on the intervals of its grids: per row and
    group, ``sigmoid(γ)`` on the upper end and ``sigmoid(β)`` on the lower one; a symmetric grid
    has the one factor ``sigmoid(γ)`` on both ends (on ``max|W|``)."""

    def __init__(self, weight: Tensor, grid: Grid) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("base", trainable(weight).detach())
        start = torch.full((weight.shape[0], len(grid.group_starts(weight.shape[1]))), INITIAL_LOGIT,
                           dtype=weight.dtype, device=weight.device)
        self.upper = nn.Parameter(start.clone())
        self.register_parameter("lower", None if grid.sym else nn.Parameter(start.clone()))

    def weight(self) -> Tensor:
        return self.base

    def ranges(self, weight: Tensor) -> GroupRanges:
        own = self.grid.group_ranges(weight)
        upper = torch.sigmoid(self.upper)
        lower = upper if self.lower is None else torch.sigmoid(self.lower)
        return GroupRanges(own.lo * lower, own.hi * upper)

    def clipping_parameters(self) -> list[nn.Parameter]:
        return [self.upper] if self.lower is None else [self.upper, self.lower]


class LWC(GradientLearner):
    """Learnable weight clipping alone: the weights stay as they are, only the grids' intervals are
    trained, at ``lr`` (OmniQuant's 1e-2)."""

    Options = LearnerOptions

    def learns_ranges(self, options: LearnerOptions) -> bool:
        return True

    def parametrize(self, linear: nn.Linear, grid: Grid, options: LearnerOptions) -> LearnedClipping:
        return LearnedClipping(linear.weight, grid)


@hookimpl
def compquant_register_learners(register) -> None:
    register("lwc", LWC())
