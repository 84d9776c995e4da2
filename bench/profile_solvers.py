"""Where a solver's time goes: cProfile of `compquant.quantize` on SmolLM2-135M (all 30 blocks, or
its first ones), split into block forwards, statistics accumulation, Cholesky/inverse,
compensation-term setup, the column loop and the error report, per calibration loop and solver; and
the run's floor: one plain forward pass of the calibration set through the blocks per stream (one
for GPTQ, two for GPTAQ and GPTAQ-based ResComp, which also follow the full-precision model) plus
the solves themselves.

    python bench/profile_solvers.py --data-dir ../shared/data --blocks 30 --nsamples 32 --threads 2 \\
        --sequential groups,blocks --out bench/results/profile_solvers.json

The block forwards of the default loop run in paused-forward greenlets; cProfile keeps one call
stack per thread, so a forward that switches away in the middle of its calls leaves it unbalanced
and what it books to `PausedForward.advance` is wrong. The loop waits in `advance` exactly as long
as a forward computes, so the "block forwards" column times those calls with a clock instead. Every
other part is called and returns between two switches, where cProfile's figures hold.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch

import compquant
from compquant.core.paused_forward import PausedForward
from compquant.core.plugin_manager import registry_for
from compquant.core.statistics import needs_fp_inputs
from common import ClockedMethod, smollm2_blocks  # bench/common.py, beside this script

# (category, function name, file suffix): cumulative times; the column loop is solve_columns minus
# what it calls that is listed separately.
PARTS = [
    ("block forwards", "run_block", "adapter.py"),
    ("statistics accumulation", "add", "calibration.py"),  # _GroupStatistics.add: each batch into a group's accumulators
    ("Cholesky / inverse", "inverse_hessian_factor", "columns.py"),
    ("compensation terms (P, R)", "least_squares_absorption", "columns.py"),
    ("error report", "relative_output_error", "calibration.py"),
]


def cumulative(stats: pstats.Stats, name: str, suffix: str) -> float:
    return sum(row[3] for (file, _, function), row in stats.stats.items() if function == name and file.endswith(suffix))


def profile(model: torch.nn.Module, windows: torch.Tensor, solver: str, sequential: str, args: argparse.Namespace,
            forward: float) -> dict:
    """One quantization of a copy of ``model`` under cProfile: its total, parts and floor."""
    config = compquant.QuantConfig(solver=solver, grid={"bits": 3, "group_size": 128},
                                   calibration={"nsamples": args.nsamples, "seqlen": args.seqlen,
                                                "sequential": sequential})
    quantized = copy.deepcopy(model)
    profiler = cProfile.Profile()
    with ClockedMethod(PausedForward, "advance") as paused:
        started = time.perf_counter()
        profiler.enable()
        compquant.quantize(quantized, config, calibration=windows)
        profiler.disable()
        total = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    solve = cumulative(stats, "solve_columns", "columns.py")
    parts: dict[str, float] = {"block forwards": paused.seconds}
    for category, name, suffix in PARTS:
        parts[category] = parts.get(category, 0.0) + cumulative(stats, name, suffix)
    inside = cumulative(stats, "inverse_hessian_factor", "columns.py") + cumulative(stats, "least_squares_absorption", "columns.py")
    parts["column loop"] = solve - inside
    instance = registry_for(None).get("solver", solver)  # the streams the loop runs follow the solver's statistics
    streams = 1 + needs_fp_inputs(instance.statistics(instance.options({})))
    return {"sequential": sequential, "solver": solver, "total": total, "floor": forward * streams + solve,
            "streams": streams, "parts": parts}


def row(result: dict, gptq_total: float | None) -> str:
    shares = " ".join(f"{v:>7.1f} ({100 * v / result['total']:>3.0f}%)" for v in result["parts"].values())
    versus = f"{result['total'] / gptq_total:>6.2f}x" if gptq_total else f"{'-':>7}"
    return (f"{result['sequential']:<7} {result['solver']:<9} {result['total']:>8.1f} {result['floor']:>8.1f} "
            f"{result['total'] / result['floor']:>6.2f}x {versus} {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--solvers", default="gptq,gptaq,rescomp")
    parser.add_argument("--sequential", default="groups", help="calibration loops, comma-separated: groups, blocks")
    parser.add_argument("--out", default=None, help="also write every row to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, windows = smollm2_blocks(args.blocks, args.nsamples, args.seqlen, args.data_dir)
    print(f"SmolLM2-135M, first {args.blocks} blocks, {args.nsamples} x {args.seqlen} calibration tokens, "
          f"W3 g128 asym, {args.threads} thread(s)")
    with torch.inference_mode():
        started = time.perf_counter()
        for batch in windows.split(8):
            model.model(batch, use_cache=False)  # the decoder stack: calibration never runs the head
        forward = time.perf_counter() - started
    print(f"one forward pass of the calibration set through the blocks: {forward:.1f} s")
    categories = list(dict.fromkeys(c for c, _, _ in PARTS)) + ["column loop"]
    print(f"{'loop':<7} {'solver':<9} {'total s':>8} {'floor s':>8} {'/floor':>7} {'vs GPTQ':>7} "
          + " ".join(f"{c[:14]:>14}" for c in categories))
    results = []
    for sequential in args.sequential.split(","):
        gptq_total = None
        for solver in args.solvers.split(","):
            result = profile(model, windows, solver, sequential, args, forward)
            results.append(result)
            gptq_total = result["total"] if solver == "gptq" else gptq_total
            print(row(result, None if solver == "gptq" else gptq_total), flush=True)
    if args.out:
        settings = {key: getattr(args, key) for key in ("blocks", "nsamples", "seqlen", "threads")}
        Path(args.out).write_text(json.dumps({"settings": settings, "forward_seconds": forward, "rows": results},
                                             indent=2))


if __name__ == "__main__":
    main()
