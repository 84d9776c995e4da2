"""Where a solver's time goes: cProfile of `compquant.quantize` on SmolLM2-135M (all 30 blocks, or
its first ones), split into block forwards, statistics accumulation, Cholesky/inverse,
compensation-term setup, the column loop and the error report, per solver; and the run's floor:
one plain forward pass of the calibration set through the model per stream (one for GPTQ, two for
GPTAQ and ResComp, which also follow the full-precision model) plus the solves themselves.

    python bench/profile_solvers.py --data-dir ../shared/data --blocks 30 --nsamples 32 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import time

import torch

import compquant
from compquant.evaluation.datasets import calibration_windows

# (category, function name, file suffix): cumulative times; the column loop is solve_columns minus
# what it calls that is listed separately.
PARTS = [
    ("block forwards", "_input_of", "calibration.py"),
    ("block forwards", "_run_block", "calibration.py"),
    ("statistics accumulation", "add", "statistics.py"),
    ("Cholesky / inverse", "inverse_hessian_factor", "columns.py"),
    ("compensation terms (P, R)", "least_squares_absorption", "columns.py"),
    ("error report", "relative_output_error", "calibration.py"),
]


def cumulative(stats: pstats.Stats, name: str, suffix: str) -> float:
    return sum(row[3] for (file, _, function), row in stats.stats.items() if function == name and file.endswith(suffix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--solvers", default="gptq,gptaq,rescomp")
    parser.add_argument("--sequential", default="groups", choices=["groups", "blocks"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = compquant.load_model("smollm2-135m")
    model = loaded.model.eval()
    model.model.layers = model.model.layers[: args.blocks]
    model.config.num_hidden_layers = args.blocks
    windows = calibration_windows(loaded.tokenizer, "wikitext2", nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                  data_dir=args.data_dir)
    print(f"SmolLM2-135M, first {args.blocks} blocks, {args.nsamples} x {args.seqlen} calibration tokens, "
          f"W3 g128 asym, sequential {args.sequential}, {args.threads} thread(s)")
    with torch.inference_mode():
        started = time.perf_counter()
        for batch in windows.split(8):
            model.model(batch, use_cache=False)  # the decoder stack: calibration never runs the head
        forward = time.perf_counter() - started
    print(f"one forward pass of the calibration set through the blocks: {forward:.1f} s")
    header = f"{'solver':<9} {'total s':>8} {'floor s':>8} " + " ".join(f"{c:>14}" for c in dict.fromkeys(c for c, _, _ in PARTS)) + f" {'column loop':>12}"
    print(header)
    for solver in args.solvers.split(","):
        config = compquant.QuantConfig(solver=solver, grid={"bits": 3, "group_size": 128},
                                       calibration={"nsamples": args.nsamples, "seqlen": args.seqlen,
                                                    "sequential": args.sequential})
        quantized = copy.deepcopy(model)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        compquant.quantize(quantized, config, calibration=windows)
        profiler.disable()
        total = time.perf_counter() - started
        stats = pstats.Stats(profiler)
        solve = cumulative(stats, "solve_columns", "columns.py")
        shares: dict[str, float] = {}
        for category, name, suffix in PARTS:
            shares[category] = shares.get(category, 0.0) + cumulative(stats, name, suffix)
        inside = cumulative(stats, "inverse_hessian_factor", "columns.py") + cumulative(stats, "least_squares_absorption", "columns.py")
        floor = forward * (1 if solver == "gptq" else 2) + solve  # the forwards the streams need, plus the solves
        print(f"{solver:<9} {total:>8.1f} {floor:>8.1f} " + " ".join(f"{v:>7.1f} ({100 * v / total:>3.0f}%)" for v in shares.values())
              + f" {solve - inside:>5.1f} ({100 * (solve - inside) / total:>3.0f}%)", flush=True)


if __name__ == "__main__":
    main()
