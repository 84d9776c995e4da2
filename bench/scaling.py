"""How the cost of one layer grows: GPTQ's solve against the layer width n (square n x n weight,
576 -> 4096; theory O(n^3): Cholesky, inverse and the column updates) and the statistics against
the number of calibration tokens N (theory O(N n^2) for H = X X^T), each with the exponent fitted
by least squares on log-log axes. No model, no data.

    taskset -c 0 python bench/scaling.py --threads 1 --out bench/results/scaling.json
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from compquant.core.columns import ColumnOptions, solve_columns
from compquant.core.quantizer import Grid
from compquant.core.saving import write_text_atomic
from compquant.core.statistics import Statistic, StatisticsAccumulator


def best_of(repeat: int, work) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def fitted_exponent(sizes: list[int], seconds: list[float]) -> float:
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--widths", default="576,1024,2048,4096")
    parser.add_argument("--tokens", default="2048,8192,32768")
    parser.add_argument("--out", help="also write the tables to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    grid, options = Grid(bits=4, group_size=128), ColumnOptions()
    result: dict = {"torch": torch.__version__, "threads": args.threads, "solve": [], "statistics": []}

    widths = [int(n) for n in args.widths.split(",")]
    for n in widths:
        x = torch.randn(4 * n, n, generator=generator)
        hessian = x.T @ x / x.shape[0]
        weight = torch.randn(n, n, generator=generator)
        seconds = best_of(args.repeat, lambda: solve_columns(weight, hessian, grid, options))
        result["solve"].append({"n": n, "seconds": seconds})
        print(f"GPTQ solve  n={n:>5}  {seconds:8.3f} s", flush=True)
    result["solve_exponent"] = fitted_exponent(widths, [row["seconds"] for row in result["solve"]])

    width = 1024
    token_counts = [int(n) for n in args.tokens.split(",")]
    for tokens in token_counts:
        x = torch.randn(tokens, width, generator=generator)

        def accumulate() -> None:
            accumulator = StatisticsAccumulator(width, frozenset({Statistic.HESSIAN}))
            for chunk in x.split(2048):
                accumulator.add(chunk)
            accumulator.result()

        seconds = best_of(args.repeat, accumulate)
        result["statistics"].append({"tokens": tokens, "n": width, "seconds": seconds})
        print(f"H = XX^T    N={tokens:>6}  n={width}  {seconds:8.3f} s", flush=True)
    result["statistics_exponent"] = fitted_exponent(token_counts, [row["seconds"] for row in result["statistics"]])
    print(f"fitted exponents: solve ~ n^{result['solve_exponent']:.2f} (theory 3), "
          f"statistics ~ N^{result['statistics_exponent']:.2f} (theory 1)")
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
