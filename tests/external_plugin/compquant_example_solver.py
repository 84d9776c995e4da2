"""A solver from outside compquant: per-row round-to-nearest that ignores the group size."""
from __future__ import annotations

import torch

import compquant


class PerRowNearest(compquant.Solver):
    def statistics(self, options):
        return frozenset()

    def solve(self, weight, stats, grid, options):
        params = grid.find_params(weight)
        codes = grid.quantize(weight, params)
        return compquant.LayerResult(
            weight=grid.dequantize(codes, params),
            codes=codes.to(torch.int16),
            scale=params.scale.unsqueeze(1),
            zero=params.zero.unsqueeze(1),
            g_idx=torch.zeros(weight.shape[1], dtype=torch.long),
        )


@compquant.hookimpl
def compquant_register_solvers(register):
    register("per-row-nearest", PerRowNearest())
