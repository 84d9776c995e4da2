"""`QuantizedLinear`: the one record of a quantized linear that every exporter reads.

Solvers return codes in their grid's own convention (signed for QuaRot-style symmetric grids);
the record normalises them to the form every packed format shares: unsigned codes in
``[0, 2^bits - 1]`` and unsigned integer zeros, so that ``weight = scale * (code - zero)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .quantizer import Grid
from .solver import LayerResult


@dataclass(frozen=True)
class LinearLayout:
    """What a checkpoint format must be able to store of one quantized linear, known before it is
    quantized (from its shape, the grid and the solver's options): an export format that cannot
    store it is refused before the work, not after."""

    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool
    act_order: bool
    groups_in_order: bool
    """False when act-order with dynamic groups puts columns of one group out of column order."""


@dataclass(frozen=True)
class QuantizedLinear:
    """Integer codes (rows, cols) in the weight's own column order, ``scale`` and ``zero``
    (rows, groups), ``g_idx`` (cols,) naming each column's group, and how they were made."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor
    bits: int
    group_size: int
    """Columns per group, or -1 for one group per row."""
    symmetric: bool
    act_order: bool

    @classmethod
    def from_result(cls, result: LayerResult, grid: Grid) -> QuantizedLinear:
        offset = grid.qmax + 1 if grid.signed else 0
        return cls(
            codes=(result.codes + offset).to(torch.uint8).cpu(),
            scale=result.scale.detach().cpu(),
            zero=(result.zero + offset).round().to(torch.uint8).cpu(),
            g_idx=result.g_idx.to(torch.int32).cpu(),
            bits=grid.bits,
            group_size=grid.group_size,
            symmetric=grid.sym,
            act_order=result.perm is not None,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale.shape[0], self.g_idx.shape[0]

    @property
    def layout(self) -> LinearLayout:
        return LinearLayout(self.shape, self.bits, self.group_size, self.symmetric, self.act_order, self.groups_in_order)

    @property
    def groups_in_order(self) -> bool:
        """True when column j is in group j // group_size (always, without dynamic act-order
        groups), so a format with no group index can express the layer."""
        columns = self.codes.shape[1]
        expected = torch.zeros(columns, dtype=torch.int32)
        if self.group_size != -1:
            expected = torch.arange(columns, dtype=torch.int32) // self.group_size
        return torch.equal(self.g_idx, expected)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``scale * (codes - zero)``, computed in the scales' dtype as the solver did, then cast."""
        index = self.g_idx.long()
        scale = self.scale[:, index]
        weight = scale * (self.codes.to(scale.dtype) - self.zero[:, index].to(scale.dtype))
        return weight if dtype is None else weight.to(dtype)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """The record's tensors under ``prefix.`` names, for a checkpoint file."""
        fields = {"codes": self.codes, "scale": self.scale, "zero": self.zero, "g_idx": self.g_idx,
                  "act_order": torch.tensor(self.act_order)}
        return {f"{prefix}.{key}": value for key, value in fields.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, grid: Grid) -> QuantizedLinear:
        """Inverse of `tensors`, for a record made on ``grid``."""
        return cls(tensors[f"{prefix}.codes"], tensors[f"{prefix}.scale"], tensors[f"{prefix}.zero"],
                   tensors[f"{prefix}.g_idx"], grid.bits, grid.group_size, grid.sym,
                   bool(tensors[f"{prefix}.act_order"]))
