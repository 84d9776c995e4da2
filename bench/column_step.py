"""The column loop's cost per column, and what a column laid out contiguously would save: a micro
experiment on one lazy block of one layer, on one thread.

`solve_columns` (core/columns.py) keeps a lazy block as (rows, 128) and freezes one column at a
time: about nine elementwise operations on the column (a strided view, one element per row of the
block), then a rank-1 ``addmm_`` into the block's later columns. This script times that step as the
solver runs it (``rows-major``) against the same operations on the block stored transposed
(``columns-major``: each column one contiguous row), and checks that both give the same bits.
It also times the whole GPTQ solve of a layer of the given shape, to give the column loop's share.

    taskset -c 1 python bench/column_step.py --rows 960,3072,576 --columns 576,576,1536
"""
from __future__ import annotations

import argparse
import time

import torch

from compquant.core.columns import inverse_hessian_factor, solve_columns
from compquant.core.quantizer import Grid
from compquant.plugins.gptq import GPTQ

BLOCK = 128


def step(values: torch.Tensor, i: int, scale: torch.Tensor, zero: torch.Tensor, factor: torch.Tensor,
         out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], transposed: bool) -> None:
    """Freeze column i of a lazy block (quantize_column + update_block for GPTQ)."""
    codes_out, quantized, errors = out
    pick = (lambda t: t[i]) if transposed else (lambda t: t[:, i])
    column = pick(values)
    codes = torch.round(column / scale).add_(zero).clamp_(0, 7)
    torch.mul(codes - zero, scale, out=pick(quantized))
    torch.div(column - pick(quantized), factor[i, i], out=pick(errors))
    pick(codes_out).copy_(codes)
    if transposed:
        values[i + 1:].addmm_(factor[i, i + 1:].unsqueeze(1), -errors[i : i + 1])
    else:
        values[:, i + 1:].addmm_(-errors[:, i : i + 1], factor[i, i + 1:].unsqueeze(0))


def block_loop(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, factor: torch.Tensor,
               transposed: bool) -> tuple[torch.Tensor, ...]:
    values = values.T.contiguous() if transposed else values.clone()
    out = tuple(torch.zeros_like(values) for _ in range(3))
    for i in range(BLOCK):
        step(values, i, scale, zero, factor, out, transposed)
    return tuple(t.T if transposed else t for t in (values, *out))


def per_column(function, repeats: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats / BLOCK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="960,3072,576", help="SmolLM2's stacked q/k/v, gate/up, down_proj")
    parser.add_argument("--columns", default="576,576,1536")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    for rows, columns in zip(map(int, args.rows.split(",")), map(int, args.columns.split(","))):
        mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
        inputs = torch.randn(4096, columns, generator=generator) @ mixing
        hessian, weight = 2 / 4096 * inputs.T @ inputs, torch.randn(rows, columns, generator=generator)
        grid, options = Grid(bits=3, group_size=128, sym=False), GPTQ().options({})
        solve = per_column(lambda: solve_columns(weight, hessian, grid, options), max(1, args.repeats // 5)) * BLOCK
        factor_s = per_column(lambda: inverse_hessian_factor(hessian, 0.01), max(1, args.repeats // 5)) * BLOCK
        factor = inverse_hessian_factor(hessian, 0.01)[:BLOCK, :BLOCK].contiguous()
        values = weight[:, :BLOCK].contiguous()
        scale, zero = torch.rand(rows, generator=generator) + 0.1, torch.round(torch.rand(rows, generator=generator) * 7)
        results = {layout: block_loop(values, scale, zero, factor, layout) for layout in (False, True)}
        same = all(torch.equal(a, b) for a, b in zip(results[False], results[True]))
        times = {layout: per_column(lambda: block_loop(values, scale, zero, factor, layout), args.repeats)
                 for layout in (False, True)}
        print(f"{rows} x {columns}: solve {solve * 1e3:.0f} ms (factorization {factor_s * 1e3:.0f} ms, the rest "
              f"{(solve - factor_s) / columns * 1e6:.0f} us/column); one column step: rows-major "
              f"{times[False] * 1e6:.0f} us, columns-major {times[True] * 1e6:.0f} us "
              f"({times[False] / times[True]:.2f}x), same bits: {same}", flush=True)


if __name__ == "__main__":
    main()
