"""The column-by-column compensation machinery that GPTQ, GPTAQ and ResComp share.

Columns are quantized one at a time in a fixed order (optionally act-order), and after each one the
not-yet-quantized columns absorb its error through the upper Cholesky factor ``U`` of the damped
inverse Hessian (docs/methods.md, GPTQ §1). Updates are applied lazily, a block of ``blocksize``
columns at a time, exactly as the reference code does.

Solvers that add least-squares terms beyond GPTQ's (GPTAQ's ``P``, §2; ResComp's ``R``, §3) describe
each as a `CompensationTerm`: when column ``j`` is frozen, later columns ``k`` receive
``coefficient(v_j) · matrix[j, k]``. Inside a block ``v_j`` is the column's value just before
quantization; what later blocks see of it is a `FrozenValue`, which the solvers' user-facing options
(GPTAQ's ``cross_block``, ResComp's ``mode``) name through `FROZEN_VALUES`.
"""
from __future__ import annotations

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

GroupTiming = Literal["block", "fresh"]


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
    group_timing: GroupTiming = Field(
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
    the dtype the solve should run in. Returns codes and grids in the original column order.

    Each column j, in quantization order, gets its group's grid, is frozen to ``q_j`` with error
    ``e_j``, and the rest of its lazy block absorbs that error; at each block end the columns after
    the block receive what the block's columns owe them (docs/methods.md, GPTQ §1, with the extra
    terms of GPTAQ §2 and ResComp §3).
    """
    w = weight.to(hessian.dtype).clone()
    h = hessian.clone()
    per_row = grid.find_params(w) if grid.group_size == -1 else None  # before dead-zeroing, as the reference
    dead = _drop_dead_columns(w, h)
    perm = torch.argsort(torch.diag(h), descending=True) if options.act_order else None
    grids = ColumnGrids(grid, w, perm, per_row=per_row, static=options.static_groups)
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, options.percdamp)
    del h
    problem = PreparedProblem(weight=w.clone(), inverse_factor=u, perm=perm, dead=dead)
    compensation = Compensation(u, list(terms(problem)) if terms is not None else [], frozen_value)

    n = w.shape[1]
    codes = torch.zeros_like(w)
    quantized = torch.zeros_like(w)
    for start in range(0, n, options.blocksize):
        block = LazyBlock.open(w, start, min(start + options.blocksize, n), compensation, grids)
        for j in range(block.start, block.stop):
            params = choose_grid(grids, j, w, block, options.group_timing)
            codes[:, j] = quantize_column(block, j, params, grid)
            update_block(block, j)
        quantized[:, block.start : block.stop] = block.quantized
        flush_block(block, w)
    return grids.result(quantized.to(weight.dtype), codes, perm)


@dataclass(frozen=True)
class Compensation:
    """How a frozen column's error reaches the columns after it: GPTQ's ``U``, the solver's extra
    terms, and what the terms of later blocks see of the frozen column."""

    factor: Tensor
    terms: Sequence[CompensationTerm]
    frozen_value: FrozenValue


@dataclass
class LazyBlock:
    """Columns ``start:stop`` of the quantization order while they are frozen one by one; the columns
    after the block receive their updates only when it is flushed (docs/methods.md, GPTQ §1: lazy
    batch)."""

    start: int
    stop: int
    values: Tensor
    """W1: the block's columns, compensated by the block's columns frozen before them."""
    quantized: Tensor
    """q_j of the frozen columns."""
    errors: Tensor
    """E: ``e_j = (w_j − q_j) / U_jj`` of the frozen columns."""
    before: Tensor | None
    """w_j just before quantization, kept when the extra terms of later blocks see it."""
    inside: Tensor
    """(1 + terms, k, k): the block's diagonal blocks of U and of each term's matrix, stacked so that
    one product applies all of a column's in-block updates."""
    compensation: Compensation
    grids: ColumnGrids

    @classmethod
    def open(cls, w: Tensor, start: int, stop: int, compensation: Compensation, grids: ColumnGrids) -> LazyBlock:
        values = w[:, start:stop].clone()
        terms = compensation.terms
        keeps_before = bool(terms) and compensation.frozen_value is not FrozenValue.QUANTIZED
        return cls(
            start=start,
            stop=stop,
            values=values,
            quantized=torch.zeros_like(values),
            errors=torch.zeros_like(values),
            before=torch.zeros_like(values) if keeps_before else None,
            inside=torch.stack([compensation.factor[start:stop, start:stop]] + [t.matrix[start:stop, start:stop] for t in terms]),
            compensation=compensation,
            grids=grids,
        )

    def frozen_values(self, done: int) -> Tensor:
        """The block's first ``done`` frozen columns as the terms of the columns after the block see them."""
        if self.compensation.frozen_value is FrozenValue.QUANTIZED:
            return self.quantized[:, :done]
        if self.compensation.frozen_value is FrozenValue.COMPENSATED or done == 0:  # none frozen: no grid to clamp to
            return self.before[:, :done]
        low, high = self.grids.representable_range(self.start + done - 1)
        return torch.clamp(self.before[:, :done], low.unsqueeze(1), high.unsqueeze(1))

    def pending(self, done: int, target: slice) -> Tensor:
        """What the block's first ``done`` frozen columns owe the columns ``target`` after the block:
        ``−E · U[frozen, target]`` plus each term's ``coefficient · matrix[frozen, target]``."""
        frozen = slice(self.start, self.start + done)
        update = -self.errors[:, :done] @ self.compensation.factor[frozen, target]
        for term in self.compensation.terms:
            update += term.coefficient(self.frozen_values(done), frozen) @ term.matrix[frozen, target]
        return update


def choose_grid(grids: ColumnGrids, j: int, w: Tensor, block: LazyBlock, timing: GroupTiming) -> QuantParams:
    """The grid column j is quantized on; a group that starts at j gets a new one from its weights."""
    if grids.starts_group(j):
        end = min(j + grids.size, w.shape[1])
        grids.params.append(grids.grid.find_params(group_source(w, block, j, end, timing)))
    return grids.use(j)


def group_source(w: Tensor, block: LazyBlock, j: int, end: int, timing: GroupTiming) -> Tensor:
    """The weights the group ``j:end`` takes its grid from (docs/methods.md, GPTQ §1: groups): as they
    stood at the start of the current lazy block (``block``, the reference), or compensated by every
    column frozen so far (``fresh``)."""
    if timing == "block":
        return w[:, j:end]
    inside = block.values[:, j - block.start : min(end, block.stop) - block.start]
    if end <= block.stop:
        return inside
    return torch.cat([inside, w[:, block.stop : end] + block.pending(j - block.start, slice(block.stop, end))], dim=1)


def quantize_column(block: LazyBlock, j: int, params: QuantParams, grid: Grid) -> Tensor:
    """Freeze column j: its codes, ``q_j`` and ``e_j = (w_j − q_j) / U_jj`` (docs/methods.md, GPTQ §1)."""
    i = j - block.start
    column = block.values[:, i]
    low, high = grid.code_range
    codes = torch.round(column / params.scale).add_(params.zero).clamp_(low, high)
    torch.mul(codes - params.zero, params.scale, out=block.quantized[:, i])
    torch.div(column - block.quantized[:, i], block.compensation.factor[j, j], out=block.errors[:, i])
    if block.before is not None:
        block.before[:, i] = column
    return codes


def update_block(block: LazyBlock, j: int) -> None:
    """The block's columns after j absorb frozen column j: ``−e_j · U[j, k]`` and, for each extra term,
    ``coefficient(w_j) · matrix[j, k]`` (docs/methods.md, GPTQ §1, GPTAQ §2, ResComp §3)."""
    if j + 1 == block.stop:
        return
    i = j - block.start
    coefficients = -block.errors[:, i : i + 1]
    if block.compensation.terms:  # GPTQ alone needs no view of w_j, nor a copy into a stack of one
        column = block.values[:, i : i + 1]
        coefficients = torch.cat([coefficients] + [term.coefficient(column, slice(j, j + 1))
                                                   for term in block.compensation.terms], dim=1)
    block.values[:, i + 1 :].addmm_(coefficients, block.inside[:, i, i + 1 :])


def flush_block(block: LazyBlock, w: Tensor) -> None:
    """The columns after the block receive what its frozen columns owe them."""
    if block.stop < w.shape[1]:
        w[:, block.stop :] += block.pending(block.stop - block.start, slice(block.stop, w.shape[1]))


class ColumnGrids:
    """The grids of one solve and the grid of each column (docs/methods.md §0; GPTQ §1: groups, static
    groups): one per row; one per static group, computed up front from the dead-zeroed weight in
    original column order (always so on a grid with learned ranges, which belong to those groups);
    or one per group of the quantization order, computed when its first column is reached."""

    def __init__(self, grid: Grid, weight: Tensor, perm: Tensor | None, *, per_row: QuantParams | None, static: bool) -> None:
        n = weight.shape[1]
        self.grid = grid
        self.size = n if grid.group_size == -1 else grid.group_size
        self.static = (static or grid.ranges is not None) and grid.group_size != -1
        self.params: list[QuantParams] = [per_row] if per_row is not None else []
        if self.static:
            self.params = [grid.find_params(weight[:, s : s + self.size], group=s // self.size)
                           for s in range(0, n, self.size)]
            self.order = perm.tolist() if perm is not None else list(range(n))
        self.of_column = [0] * n

    def starts_group(self, j: int) -> bool:
        """Column j opens a group whose grid is computed now."""
        return not self.static and self.grid.group_size != -1 and j % self.size == 0

    def use(self, j: int) -> QuantParams:
        """The grid of column j: its static group's, or the newest one."""
        index = self.order[j] // self.size if self.static else len(self.params) - 1
        self.of_column[j] = index
        return self.params[index]

    def representable_range(self, j: int) -> tuple[Tensor, Tensor]:
        """Per row, the smallest and largest value the grid of column j can express."""
        return self.grid.representable_range(self.params[self.of_column[j]])

    def result(self, quantized: Tensor, codes: Tensor, perm: Tensor | None) -> LayerResult:
        """The solve's outcome in the original column order."""
        g_idx = torch.tensor(self.of_column, dtype=torch.long, device=codes.device)
        if perm is not None:
            inverse = torch.argsort(perm)
            quantized, codes, g_idx = quantized[:, inverse], codes[:, inverse], g_idx[inverse]
        return LayerResult(
            weight=quantized,
            codes=codes.to(torch.int16),
            scale=torch.stack([g.scale for g in self.params], dim=1),
            zero=torch.stack([g.zero for g in self.params], dim=1),
            g_idx=g_idx,
            perm=perm,
        )


def _drop_dead_columns(w: Tensor, h: Tensor) -> Tensor:
    """Inputs that never fire (``H_jj = 0``) get ``H_jj = 1`` and a zero weight column, in place
    (docs/methods.md §0); returns their mask."""
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return dead
