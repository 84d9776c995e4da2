"""Calibration statistics of one group of linears that read the same input.

In the notation of `../shared/docs/algorithms.md`: X are the inputs the partly quantized model feeds
the layer, X̃ the full-precision model's inputs for the same tokens. Solvers ask for what they need:

* ``HESSIAN``: ``H = 2/N · X Xᵀ`` (GPTQ and everything built on it);
* ``CROSS``: ``dXXT = 2/N · (X̃ − X) Xᵀ`` (GPTAQ, GPTAQ-based ResComp). Asking for it makes the
  calibration loop keep a full-precision stream beside the quantized one.

N counts tokens; the scale cancels in every update. Accumulation is a running mean, so the sums
never grow with the number of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor


class Statistic(str, Enum):
    HESSIAN = "hessian"
    CROSS = "cross"


class NonFiniteStatisticsError(ArithmeticError):
    """NaN or Inf reached the statistics: the model or the data produced them."""


@dataclass(frozen=True)
class LayerStatistics:
    """What a solver sees of its calibration data. Treat the tensors as read-only: the linears of
    one group share them."""

    hessian: Tensor
    cross: Tensor | None
    tokens: int


class StatisticsAccumulator:
    """Running ``H`` (and ``dXXT`` when asked) over batches of inputs of width ``columns``."""

    def __init__(
        self,
        columns: int,
        wanted: frozenset[Statistic],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.wanted = wanted
        self.dtype = dtype
        self.tokens = 0
        self.hessian = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.cross = (
            torch.zeros(columns, columns, dtype=dtype, device=device) if Statistic.CROSS in wanted else None
        )

    def add(self, inputs: Tensor, fp_inputs: Tensor | None = None) -> None:
        """Add a batch; ``inputs`` and ``fp_inputs`` are (..., columns) for the same tokens."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.dtype)
        new = x.shape[0]
        total = self.tokens + new
        keep, alpha = self.tokens / total, 2.0 / total
        self.hessian.mul_(keep).addmm_(x.T, x, alpha=alpha)
        if self.cross is not None:
            if fp_inputs is None:
                raise ValueError("the cross term (X̃ − X)Xᵀ needs the full-precision inputs; pass fp_inputs")
            delta = fp_inputs.reshape(-1, fp_inputs.shape[-1]).to(self.dtype) - x
            self.cross.mul_(keep).addmm_(delta.T, x, alpha=alpha)
        self.tokens = total

    def result(self) -> LayerStatistics:
        if self.tokens == 0:
            raise ValueError("no calibration inputs were accumulated")
        for name, tensor in (("H = XXᵀ", self.hessian), ("dXXT", self.cross)):
            if tensor is not None and not torch.isfinite(tensor).all():
                raise NonFiniteStatisticsError(f"{name} holds NaN or Inf values")
        return LayerStatistics(self.hessian, self.cross, self.tokens)
