"""The one uniform weight quantizer every solver shares.

A `Grid` says how a row (or a group of columns within a row) maps to integers: bits, symmetric or
asymmetric, group size, optional MSE clipping search, and which of the two published conventions
is used (docs/methods.md §0):

* ``quarot`` (default; QuaRot/GPTAQ/ResComp/SpinQuant): symmetric grids are signed,
  codes in ``[-(qmax+1), qmax]`` with ``qmax = 2^(b-1) - 1``, ``scale = absmax / qmax``, zero 0;
  asymmetric grids use ``qmax = 2^b - 1`` and clamp the scale at 1e-5.
* ``ist`` (IST-DASLab/gptq, to reproduce the GPTQ README): always unsigned codes; symmetric grids
  put the zero at ``(qmax + 1) / 2``; no scale clamp.

Everywhere ``weight = scale * (code - zero)``, with one scale and zero per row and group.

A grid may carry learned `GroupRanges` (a learner's clipping, docs/learners.md): each group's scale
and zero then come from its learned interval instead of the weights' own min/max.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

Convention = Literal["quarot", "ist"]


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero of one grid, one entry per row (shape ``(rows,)``)."""

    scale: Tensor
    zero: Tensor


@dataclass(frozen=True, eq=False)
class GroupRanges:
    """The interval each grid of one linear covers, ``lo`` and ``hi`` of shape (rows, groups),
    learned instead of read off the weights (a learner's clipping). Like the weights' own ranges
    they hold 0 (``lo <= 0 <= hi``), so that every zero point lies on the code range."""

    lo: Tensor
    hi: Tensor

    @classmethod
    def stacked(cls, ranges: Sequence[GroupRanges]) -> GroupRanges:
        """The ranges of linears solved as one stacked matrix (their rows one after another)."""
        return cls(torch.cat([r.lo for r in ranges]), torch.cat([r.hi for r in ranges]))

    def of_group(self, group: int | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """The (rows,) interval of ``group``, in ``like``'s dtype and device; None names the only group."""
        if group is None:
            if self.lo.shape[1] != 1:
                raise ValueError(f"this grid carries learned ranges for {self.lo.shape[1]} groups, so the solver must "
                                 "say which group it quantizes: grid.find_params(w, group=index)")
            group = 0
        return self.lo[:, group].to(like), self.hi[:, group].to(like)


@dataclass(frozen=True)
class Grid:
    """A uniform integer grid for weights; ``group_size=-1`` means one grid per row. With
    ``ranges`` (see `with_ranges`), the intervals of one linear's grids are learned ones."""

    bits: int = 4
    sym: bool = False
    group_size: int = 128
    clip: bool = False
    convention: Convention = "quarot"
    clip_steps: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4
    ranges: GroupRanges | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be positive or -1 (per row), got {self.group_size}")
        if self.convention not in ("quarot", "ist"):
            raise ValueError(f"convention must be 'quarot' or 'ist', got {self.convention!r}")

    @property
    def signed(self) -> bool:
        return self.sym and self.convention == "quarot"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def code_range(self) -> tuple[int, int]:
        """Smallest and largest integer code."""
        return (-(self.qmax + 1), self.qmax) if self.signed else (0, self.qmax)

    def group_starts(self, columns: int) -> range:
        """First column of every group; the last group may be partial."""
        return range(0, columns, columns if self.group_size == -1 else self.group_size)

    def with_ranges(self, ranges: GroupRanges | None) -> Grid:
        """This grid with learned intervals for one linear's groups (or without them, for None)."""
        return replace(self, ranges=ranges)

    # ---------------------------------------------------------------- parameters
    def find_params(self, w: Tensor, group: int | None = None) -> QuantParams:
        """Scale and zero for each row of ``w`` (rows, columns), with the clip search if enabled.
        With learned ``ranges``, the interval of ``group`` (the index of ``w``'s group in its
        linear) replaces ``w``'s own, and there is nothing to search."""
        if self.ranges is not None:
            return self.params_from_range(*self.ranges.of_group(group, w))
        lo, hi = self.weight_range(w)
        params = self.params_from_range(lo, hi)
        return self._clip_search(w, lo, hi, params) if self.clip else params

    def params_from_range(self, lo: Tensor, hi: Tensor) -> QuantParams:
        """Scale and zero of the grids covering ``[lo, hi]`` (any shape), differentiable in ``lo``
        and ``hi`` except through the rounded zero point (as in OmniQuant)."""
        return self._params_from_range(lo, hi, clamp_span=True)

    def group_ranges(self, w: Tensor) -> GroupRanges:
        """The interval each group of ``w`` (rows, columns) covers by its own min/max (differentiable)."""
        size = w.shape[1] if self.group_size == -1 else self.group_size
        lows, highs = zip(*(self.weight_range(w[:, start : start + size]) for start in self.group_starts(w.shape[1])))
        return GroupRanges(torch.stack(lows, dim=1), torch.stack(highs, dim=1))

    def group_index(self, columns: int, device: torch.device | str | None = None) -> Tensor:
        """The group of each of ``columns`` input columns, in column order."""
        size = columns if self.group_size == -1 else self.group_size
        return torch.arange(columns, device=device) // size

    def weight_range(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row interval the grid must cover; it always contains 0."""
        zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        lo = torch.minimum(w.min(dim=1).values, zeros)
        hi = torch.maximum(w.max(dim=1).values, zeros)
        if self.signed:
            absmax = torch.maximum(lo.abs(), hi).clamp(min=1e-5)
            return -absmax, absmax
        if self.sym:  # ist: unsigned codes around a mid-range zero
            hi = torch.maximum(lo.abs(), hi)
            lo = torch.where(lo < 0, -hi, lo)
        both_zero = (lo == 0) & (hi == 0)
        return torch.where(both_zero, -1.0, lo), torch.where(both_zero, 1.0, hi)

    def _params_from_range(self, lo: Tensor, hi: Tensor, *, clamp_span: bool) -> QuantParams:
        if self.signed:
            scale = hi / self.qmax
            return QuantParams(scale, torch.zeros_like(scale))
        span = hi - lo
        if clamp_span and self.convention == "quarot":
            span = span.clamp(min=1e-5)
        scale = span / self.qmax
        zero = torch.full_like(scale, (self.qmax + 1) / 2) if self.sym else torch.round(-lo / scale)
        return QuantParams(scale, zero)

    def _clip_search(self, w: Tensor, lo: Tensor, hi: Tensor, params: QuantParams) -> QuantParams:
        """Shrink the range step by step and keep, per row, the grid with the lowest |error|^norm
        (strictly lower wins, as in the references)."""
        scale, zero = params.scale.clone(), params.zero.clone()
        best_err = torch.full_like(scale, float("inf"))
        for step in range(int(self.clip_max_shrink * self.clip_steps)):
            shrink = 1 - step / self.clip_steps
            candidate = self._params_from_range(shrink * lo, shrink * hi, clamp_span=False)
            err = (self.fake_quantize(w, candidate) - w).abs_().pow_(self.clip_norm).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, candidate.scale, scale)
            zero = torch.where(better, candidate.zero, zero)
        return QuantParams(scale, zero)

    # ---------------------------------------------------------------- mapping
    def quantize(self, w: Tensor, params: QuantParams) -> Tensor:
        """Integer codes (as a float tensor of ``w``'s dtype) for ``w``, rows matching ``params``."""
        scale, zero = _column(params.scale, w), _column(params.zero, w)
        low, high = self.code_range
        return torch.clamp(torch.round(w / scale) + zero, low, high)

    def dequantize(self, codes: Tensor, params: QuantParams) -> Tensor:
        return _column(params.scale, codes) * (codes - _column(params.zero, codes))

    def fake_quantize(self, w: Tensor, params: QuantParams) -> Tensor:
        return self.dequantize(self.quantize(w, params), params)

    def representable_range(self, params: QuantParams) -> tuple[Tensor, Tensor]:
        """Smallest and largest value each row's grid can express."""
        low, high = self.code_range
        return params.scale * (low - params.zero), params.scale * (high - params.zero)


def _column(values: Tensor, like: Tensor) -> Tensor:
    """A per-row vector shaped to broadcast against ``like`` (rows) or (rows, columns)."""
    return values if like.dim() == 1 else values.unsqueeze(1)
