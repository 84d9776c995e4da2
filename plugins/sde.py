"""Learned singular values, with LWC: LSI (learnable singular-value increments, docs/learners.md §2)
and CQE+'s singular-value diagonal expansion, SDE (§3, our reading).

Both take the SVD ``W = U diag(σ) Vᵀ`` of each linear once, before training, and learn a matrix
``E`` (initialised at 0) inside it: the weight that gets quantized is ``U (diag(σ) + E) Vᵀ``. LSI's
``E`` is diagonal (one increment per singular value). Our reading of SDE lets ``E`` fill ``band``
diagonals above and below the main one, optionally only in the leading ``rank`` singular directions
(the top-left corner), so neighbouring directions are coupled instead of only rescaled; ``band: 0``
is LSI. The weight is computed as ``W + U E Vᵀ``, the same matrix, which is exactly W while E is 0.
The clipping of every grid is learned beside ``E`` (`compquant.plugins.lwc`).
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ..core.learner import GradientLearner, LearnerOptions
from ..core.plugin_manager import hookimpl
from ..core.quantizer import Grid
from .lwc import LearnedClipping


class LSIOptions(LearnerOptions):
    """LSI's options: those of every learner (``lr`` is the clipping's) and the singular values' rate."""

    sv_lr: float = Field(2e-4, gt=0, description="learning rate of the singular-value parameters E (LSI's reported "
                                                 "setting: about 2e-4)")


class SDEOptions(LSIOptions):
    """SDE's options (docs/learners.md §3): the band of E, its rank and a penalty on it."""

    band: int = Field(1, ge=0, description="diagonals above and below the main one that E fills (0: LSI exactly)")
    rank: int | None = Field(None, ge=1, description="the leading singular directions E covers (default: all)")
    penalty: float = Field(0.0, ge=0, description="λ of the loss term λ‖E‖², which keeps W(E) near W")


class SingularValueExpansion(LearnedClipping):
    """One linear's weight as ``W + U_r E V_rᵀ`` (the leading ``rank`` singular directions), with
    ``E`` nonzero on its main diagonal and ``band`` diagonals either side, and LWC's clipping."""

    def __init__(self, weight: Tensor, grid: Grid, *, band: int = 0, rank: int | None = None,
                 penalty: float = 0.0) -> None:
        super().__init__(weight, grid)
        u, _, vh = torch.linalg.svd(self.base.to(torch.promote_types(self.base.dtype, torch.float32)),
                                    full_matrices=False)
        size = min(rank or u.shape[1], u.shape[1])
        self.register_buffer("u", u[:, :size].to(self.base.dtype).contiguous())
        self.register_buffer("vh", vh[:size].to(self.base.dtype).contiguous())
        like = dict(dtype=self.base.dtype, device=self.base.device)
        self.diagonal = nn.Parameter(torch.zeros(size, **like))
        offsets = [offset for distance in range(1, min(band, size - 1) + 1) for offset in (distance, -distance)]
        self.offsets = offsets
        self.bands = nn.ParameterList([nn.Parameter(torch.zeros(size - abs(offset), **like)) for offset in offsets])
        self.penalty_strength = penalty

    def expansion(self) -> Tensor:
        """E off its main diagonal, (rank, rank)."""
        return sum(torch.diag(values, offset) for values, offset in zip(self.bands, self.offsets))

    def weight(self) -> Tensor:
        weight = self.base + (self.u * self.diagonal) @ self.vh
        if self.offsets:
            weight = weight + self.u @ self.expansion() @ self.vh
        return weight

    def penalty(self) -> Tensor | None:
        if not self.penalty_strength:
            return None
        return self.penalty_strength * sum(values.square().sum() for values in [self.diagonal, *self.bands])

    def param_groups(self, options: LSIOptions) -> list[dict]:
        return [{"params": self.clipping_parameters(), "lr": options.lr},
                {"params": [self.diagonal, *self.bands], "lr": options.sv_lr}]


class LSI(GradientLearner):
    """Learnable singular-value increments with LWC: ``W(δ) = U diag(σ + δ) Vᵀ``."""

    Options = LSIOptions

    def learns_ranges(self, options: LearnerOptions) -> bool:
        return True

    def parametrize(self, linear: nn.Linear, grid: Grid, options: LSIOptions) -> SingularValueExpansion:
        return SingularValueExpansion(linear.weight, grid)


class SDE(LSI):
    """CQE+'s singular-value diagonal expansion with LWC, as we read it (the module docstring);
    with ``lookahead`` it is CQE+ (SDE with cross-layer learning)."""

    Options = SDEOptions

    def parametrize(self, linear: nn.Linear, grid: Grid, options: SDEOptions) -> SingularValueExpansion:
        return SingularValueExpansion(linear.weight, grid, band=options.band, rank=options.rank,
                                      penalty=options.penalty)


@hookimpl
def compquant_register_learners(register) -> None:
    register("lsi", LSI())
    register("sde", SDE())
