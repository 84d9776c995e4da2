"""The column-by-column compensation machinery that GPTQ, GPTAQ and ResComp share.

Columns are quantized one at a time in a fixed order (optionally act-order), and after each one the
not-yet-quantized columns absorb its error through the upper Cholesky factor ``U`` of the damped
inverse Hessian (`../shared/docs/algorithms.md`, section 1). Updates are applied lazily, a block of
``blocksize`` columns at a time, exactly as the reference code does.

Solvers that add least-squares terms beyond GPTQ's (GPTAQ's ``P``, ResComp's ``R``) describe each as a
`CompensationTerm`: when column ``j`` is frozen, later columns ``k`` receive
``coefficient(v_j) · matrix[j, k]``. Inside a block ``v_j`` is the column's value just before
quantization; what later blocks see of it is a `FrozenValue`, which the solvers' user-facing options
(GPTAQ's ``cross_block``, ResComp's ``mode``) name through `FROZEN_VALUES`.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from .quantizer import Grid, QuantParams
from .solver import LayerResult, SolverOptions

log = logging.getLogger(__name__)


class FrozenValue(Enum):
    """The value of a frozen column that the extra terms of later lazy blocks see. Inside its own block
    a column always contributes its value just before quantization; the block end is where the
    references differ from the block-free math."""

    QUANTIZED = "quantized"
    """q_j: the released GPTAQ code and ResComp ``org``."""
    COMPENSATED = "compensated"
    """w_j as it was just before quantization: the block-free math."""
    CLAMPED = "clamped"
    """w_j clamped to the range of the grid active at the block's last column: ResComp ``allw``."""


FROZEN_VALUES: dict[str, FrozenValue] = {
    "released": FrozenValue.QUANTIZED,  # GPTAQ cross_block
    "org": FrozenValue.QUANTIZED,  # ResComp mode
    "allw": FrozenValue.CLAMPED,  # ResComp mode
    "exact": FrozenValue.COMPENSATED,  # GPTAQ cross_block and ResComp mode
}
"""The solvers' option values for what later blocks see of a frozen column, in one vocabulary."""


class NumericalWarning(UserWarning):
    """The Hessian needed more damping than asked for."""


class ColumnOptions(SolverOptions):
    """Options of every solver built on the column machinery."""

    percdamp: float = Field(0.01, ge=0, description="damping as a fraction of mean(diag H)")
    blocksize: int = Field(128, ge=1, description="columns per lazy block update")
    act_order: bool = Field(False, description="quantize columns in order of decreasing diag(H)")
    static_groups: bool = Field(False, description="compute all group grids up front from the original weight")
    group_timing: Literal["block", "fresh"] = Field(
        "block",
        description="grid of a group that starts inside a lazy block: from the weights as they stood at "
        "the block start (reference) or from the fully compensated weights",
    )

    @model_validator(mode="after")
    def _static_groups_have_no_timing(self) -> ColumnOptions:
        if self.static_groups and "group_timing" in self.model_fields_set:
            raise ValueError("static_groups computes every grid up front, so group_timing has no meaning with it; drop one")
        return self


@dataclass(frozen=True)
class CompensationTerm:
    """An extra compensation: ``matrix`` is (n, n), strictly upper triangular, in quantization order;
    ``coefficient(values, columns)`` maps the values (rows, k) of the frozen columns at positions
    ``columns`` (a slice in quantization order) to the coefficients that multiply ``matrix[columns]``."""

    matrix: Tensor
    coefficient: Callable[[Tensor, slice], Tensor]


@dataclass(frozen=True)
class PreparedProblem:
    """The problem in quantization order, as the terms of a solver need to see it."""

    weight: Tensor
    """(rows, n): dead columns zeroed, permuted; the original weight the ResComp term refers to."""
    inverse_factor: Tensor
    """U with ``H_d⁻¹ = UᵀU``, permuted."""
    perm: Tensor | None
    dead: Tensor
    """Boolean mask of dead input columns (zero diagonal), original order."""

    def permute(self, matrix: Tensor) -> Tensor:
        """A square statistic in quantization order."""
        return matrix if self.perm is None else matrix[self.perm][:, self.perm]


TermsFactory = Callable[[PreparedProblem], Sequence[CompensationTerm]]


def least_squares_absorption(statistic: Tensor, problem: PreparedProblem, scale: float) -> Tensor:
    """``scale · triu(S · Uᵀ, 1) · U`` for a cross statistic S (original column order):
    row j is ``scale · S[j, F] · inv(H_d[F, F])`` with F the columns after j in quantization order."""
    permuted = problem.permute(statistic.to(problem.inverse_factor.dtype))
    u = problem.inverse_factor
    return scale * torch.triu(permuted @ u.T, diagonal=1) @ u


def asymmetric_term(cross: Tensor, problem: PreparedProblem, alpha: float) -> CompensationTerm:
    """GPTAQ's P term: column j's residual ``w_j ΔX_j`` absorbed by the columns after it."""
    cross = cross.clone()
    cross[:, problem.dead] = 0
    return CompensationTerm(least_squares_absorption(cross, problem, alpha), lambda values, columns: values)


def inverse_hessian_factor(hessian: Tensor, percdamp: float, *, max_tries: int = 8) -> Tensor:
    """Upper Cholesky factor U of ``(H + λI)⁻¹``, λ = percdamp · mean(diag H).

    A Hessian that is not positive definite after damping gets ten times more damping, with a
    `NumericalWarning`, until the factorizations succeed.
    """
    mean_diag = torch.mean(torch.diag(hessian)).item()
    damp = percdamp * mean_diag
    for attempt in range(max_tries):
        damped = hessian.clone()  # one n x n work matrix at a time: n is 11008 for Llama-2-7B's down_proj
        damped.diagonal().add_(damp)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper
        new_damp = max(damp * 10, 1e-6 * mean_diag, torch.finfo(hessian.dtype).tiny)
        warnings.warn(
            f"Hessian is not positive definite with damping {damp:.3g}; retrying with {new_damp:.3g} "
            f"(attempt {attempt + 2} of {max_tries}). More calibration tokens or a larger percdamp avoid this.",
            NumericalWarning,
            stacklevel=2,
        )
        damp = new_damp
    raise ArithmeticError(
        f"the Hessian stayed singular after {max_tries} damping increases (last λ = {damp:.3g}); "
        "check the calibration inputs for NaN/Inf or constant features"
    )


def solve_columns(
    weight: Tensor,
    hessian: Tensor,
    grid: Grid,
    options: ColumnOptions,
    *,
    terms: TermsFactory | None = None,
    frozen_value: FrozenValue = FrozenValue.QUANTIZED,
) -> LayerResult:
    """Quantize ``weight`` (rows, n) column by column against ``hessian`` (n, n), both already in
    the dtype the solve should run in. Returns codes and grids in the original column order."""
    rows, n = weight.shape
    dtype = hessian.dtype
    w = weight.to(dtype).clone()
    h = hessian.clone()
    per_row = grid.find_params(w) if grid.group_size == -1 else None  # before dead-zeroing, as the reference

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    group = grid.group_size if grid.group_size != -1 else n
    static = None
    if options.static_groups and grid.group_size != -1:
        static = [grid.find_params(w[:, s : s + group]) for s in range(0, n, group)]

    perm = torch.argsort(torch.diag(h), descending=True) if options.act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, options.percdamp)
    del h
    problem = PreparedProblem(weight=w.clone(), inverse_factor=u, perm=perm, dead=dead)
    extra = list(terms(problem)) if terms is not None else []

    grids: list[QuantParams] = static if static is not None else ([per_row] if per_row is not None else [])
    column_grid = [0] * n
    order = perm.tolist() if perm is not None else list(range(n))
    low_code, high_code = grid.code_range
    codes = torch.zeros_like(w)
    quantized = torch.zeros_like(w)
    current = 0

    for i1 in range(0, n, options.blocksize):
        i2 = min(i1 + options.blocksize, n)
        block = w[:, i1:i2].clone()
        # row 0: GPTQ's U; then one row per extra term: a column's updates of the later columns of
        # its block are one (rows × k) @ (k × rest) product
        updates = torch.stack([u[i1:i2, i1:i2]] + [term.matrix[i1:i2, i1:i2] for term in extra])
        q_block = torch.zeros_like(block)
        err_block = torch.zeros_like(block)
        pre_block = torch.zeros_like(block) if extra and frozen_value is not FrozenValue.QUANTIZED else None

        def carried(done: int) -> Tensor:
            """Values of the block's first ``done`` frozen columns as later columns see them."""
            if frozen_value is FrozenValue.QUANTIZED or pre_block is None:
                return q_block[:, :done]
            if frozen_value is FrozenValue.COMPENSATED:
                return pre_block[:, :done]
            low, high = grid.representable_range(grids[column_grid[i1 + done - 1]])
            return torch.clamp(pre_block[:, :done], low.unsqueeze(1), high.unsqueeze(1))

        def pending(done: int, target: slice) -> Tensor:
            """Updates the block's first ``done`` frozen columns owe the columns ``target`` (>= i2)."""
            frozen = slice(i1, i1 + done)
            update = -err_block[:, :done] @ u[frozen, target]
            for term in extra:
                update += term.coefficient(carried(done), frozen) @ term.matrix[frozen, target]
            return update

        for i in range(i2 - i1):
            j = i1 + i
            if static is not None:
                current = order[j] // group
            elif grid.group_size != -1 and j % group == 0:
                grids.append(grid.find_params(_group_source(w, block, j, i, i1, i2, group, options, pending)))
                current = len(grids) - 1
            column_grid[j] = current
            scale, zero = grids[current].scale, grids[current].zero

            col = block[:, i]  # a view: read everything that needs w_j before the updates below
            col_codes = torch.round(col / scale).add_(zero).clamp_(low_code, high_code)
            torch.mul(col_codes - zero, scale, out=q_block[:, i])
            torch.div(col - q_block[:, i], u[j, j], out=err_block[:, i])
            codes[:, j] = col_codes
            if pre_block is not None:
                pre_block[:, i] = col
            if i + 1 < i2 - i1:
                column = slice(j, j + 1)
                coefficients = [-err_block[:, i : i + 1]] + [term.coefficient(col.unsqueeze(1), column) for term in extra]
                block[:, i + 1 :].addmm_(torch.cat(coefficients, dim=1), updates[:, i, i + 1 :])

        quantized[:, i1:i2] = q_block
        if i2 < n:
            w[:, i2:] += pending(i2 - i1, slice(i2, n))

    g_idx = torch.tensor(column_grid, dtype=torch.long, device=w.device)
    if perm is not None:
        inverse = torch.argsort(perm)
        quantized, codes, g_idx = quantized[:, inverse], codes[:, inverse], g_idx[inverse]
    return LayerResult(
        weight=quantized.to(weight.dtype),
        codes=codes.to(torch.int16),
        scale=torch.stack([g.scale for g in grids], dim=1),
        zero=torch.stack([g.zero for g in grids], dim=1),
        g_idx=g_idx,
        perm=perm,
    )


def _group_source(
    w: Tensor,
    block: Tensor,
    j: int,
    i: int,
    i1: int,
    i2: int,
    group: int,
    options: ColumnOptions,
    pending: Callable[[int, slice], Tensor],
) -> Tensor:
    """The weights a group starting at column ``j`` takes its grid from."""
    end = min(j + group, w.shape[1])
    if options.group_timing == "block":
        return w[:, j:end]
    inside = block[:, i : min(end, i2) - i1]
    if end <= i2:
        return inside
    return torch.cat([inside, w[:, i2:end] + pending(i, slice(i2, end))], dim=1)
