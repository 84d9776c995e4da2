"""Wall time of one layer's solve, per solver and shape (no model, no data): the part of a run that
is pure algorithm. Usage: python bench/solve_speed.py [--threads 1] [--repeat 3]"""
from __future__ import annotations

import argparse
import time

import torch

import compquant

SHAPES = {"q_proj 576x576": (576, 576), "gate+up 3072x576": (3072, 576), "down 576x1536": (576, 1536)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.tokens} calibration tokens, best of {args.repeat}")
    print(f"{'shape':<20} {'solver':<8} {'seconds':>8}")
    for label, (rows, columns) in SHAPES.items():
        inputs = torch.randn(args.tokens, columns, generator=generator)
        fp_inputs = inputs + 0.1 * torch.randn(args.tokens, columns, generator=generator)
        weight = torch.randn(rows, columns, generator=generator)
        for solver in ("rtn", "gptq", "gptaq", "rescomp"):
            best = float("inf")
            for _ in range(args.repeat):
                started = time.perf_counter()
                compquant.quantize_layer(weight, inputs, solver=solver, fp_inputs=fp_inputs, bits=3, group_size=128)
                best = min(best, time.perf_counter() - started)
            print(f"{label:<20} {solver:<8} {best:>8.3f}")


if __name__ == "__main__":
    main()
