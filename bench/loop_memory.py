"""Peak memory of the calibration loop on SmolLM2-135M: how much the process grows while
quantizing, per solver and loop, each run in a fresh process, with a digest of every code so that
runs of two trees can be compared bit for bit.

The growth is what the loop holds beyond the loaded model: the calibration activations, the paused
forwards (docs/methods.md §4), a block copy for the full-precision stream, the statistics and the
solves. Run it once per tree to compare loops, e.g. the tree before one pass per block:

    python bench/loop_memory.py --blocks 4 --nsamples 32 --threads 2 --label one-pass
    git archive <commit> | tar -x -C /tmp/before/compquant
    PYTHONPATH=/tmp/before python bench/loop_memory.py --blocks 4 --nsamples 32 --threads 2 --label rerunning

Memory does not depend on the number of blocks (one block is in flight at a time), so a few blocks
give the 30-block peak; nor on the machine being busy, unlike the times.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import SOLVERS, smollm2_blocks  # bench/common.py, beside this script
from process_memory import rss_mib  # bench/process_memory.py, beside this script

HIDDEN, INTERMEDIATE = 576, 1536  # SmolLM2-135M


def one_run(args: argparse.Namespace) -> dict:
    """The quantization of one solver in this process: growth of the peak RSS over the RSS before it."""
    import torch

    import compquant
    from compquant.core.checkpoint import tensor_digest

    torch.set_num_threads(args.threads)
    model, windows = smollm2_blocks(args.blocks, args.nsamples, args.seqlen, args.data_dir)
    solver, options = SOLVERS[args.solver]
    config = compquant.QuantConfig(solver=solver, solver_options=options, grid={"bits": 3, "group_size": 128},
                                   calibration={"nsamples": args.nsamples, "seqlen": args.seqlen,
                                                "batch_size": args.batch_size, "sequential": args.sequential,
                                                "fp_inputs": args.fp_inputs})
    before = rss_mib("VmRSS")
    report = compquant.quantize(model, config, calibration=windows)
    peak = rss_mib()
    codes = tensor_digest((name, record.codes) for name, record in sorted(report.records.items()))
    return {"solver": args.solver, "growth_mib": peak - before, "rss_before_mib": before, "peak_mib": peak,
            "codes_sha256": codes, "seconds": report.seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--solvers", default="gptq,gptaq", help=f"from {list(SOLVERS)}")
    parser.add_argument("--sequential", default="groups", choices=["groups", "blocks"])
    parser.add_argument("--fp-inputs", default="auto", choices=["auto", "stream", "cache"])
    parser.add_argument("--label", default="", help="names this tree's rows in the output")
    parser.add_argument("--out", default=None, help="append the rows to this JSON file")
    parser.add_argument("--solver", help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.solver:
        print(json.dumps(one_run(args)))
        return 0
    batches = -(-args.nsamples // args.batch_size)
    tokens = args.batch_size * args.seqlen
    # what a forward paused at down_proj holds per batch: the residual, the normed input, the product
    paused = batches * tokens * (2 * HIDDEN + INTERMEDIATE) * 4 / 2**20
    stream = args.nsamples * args.seqlen * HIDDEN * 4 / 2**20
    print(f"SmolLM2-135M, {args.blocks} blocks, {args.nsamples} x {args.seqlen} tokens in {batches} batches, "
          f"sequential {args.sequential}, fp_inputs {args.fp_inputs}, {args.threads} thread(s) [{args.label}]")
    print(f"one stream's block inputs: {stream:.0f} MiB; one block's activations per batch at down_proj, all "
          f"batches: {paused:.0f} MiB")
    rows = []
    for solver in args.solvers.split(","):
        child = [*sys.argv[1:], "--solver", solver]
        done = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        result = {**json.loads(done.stdout.strip().splitlines()[-1]), "label": args.label,
                  "settings": {k: getattr(args, k) for k in ("blocks", "nsamples", "seqlen", "batch_size", "threads",
                                                            "sequential", "fp_inputs")}}
        rows.append(result)
        print(f"{solver:<15} growth {result['growth_mib']:7.0f} MiB  peak {result['peak_mib']:6.0f} MiB  "
              f"codes {result['codes_sha256'][:16]}  {result['seconds']:6.1f} s", flush=True)
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps((json.loads(out.read_text()) if out.exists() else []) + rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
