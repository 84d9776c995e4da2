"""One process with 2 threads against 2 ranks with 1 thread each, on this machine's 2 cores: GPTQ and
GPTAQ at W4 g128 on SmolLM2-135M (all 30 blocks), 128 x 512 calibration tokens of WikiText-2
validation, float32 statistics. For each run: wall time, each rank's peak RSS and where its time
went (block forwards, statistics, reductions, solves, row gathers, idle), the WikiText-2 test
perplexity, and how many integer codes differ from the one-process run; beside them, one process
that sums the same tokens in calibration batches of 4 windows instead of 8 (`1x2-b4`), whose
difference from the first run is float32 rounding alone, the yardstick for the ranks' difference.

    python bench/ranks_smollm2.py --data-dir ../shared/data --out bench/results/ranks_smollm2.json

Each run is a fresh process (`torch.distributed.run` for the ranks), so its peak RSS is its own;
rank 0 evaluates the model once the ranks are done (with 2 threads, not timed). Idle is the time a
rank waits in a barrier put in front of each collective for the slowest rank to arrive, so the
reduction and gather columns are the collectives themselves. A finished run is kept in the JSON
output at once: a killed table resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import PhaseClocks, resumed_table  # bench/common.py, beside this script

# processes x threads, and windows per calibration batch: "1x2-b4" is one process summing the same
# tokens in batches of 4 instead of 8, another order of the same float32 sums, to tell the size of
# that noise from what the ranks change
LAYOUTS = {"1x2": (1, 2, 8), "2x1": (2, 1, 8), "1x2-b4": (1, 2, 4)}


def worker(args: argparse.Namespace) -> None:
    """One rank: quantize, clock the phases, write this rank's figures (and rank 0 the codes and
    the perplexity) under ``args.scratch``."""
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    import compquant
    from compquant.core.distributed import ranks_from_environment
    from compquant.core.measure import measure
    from compquant.core.plugin_manager import registry_for
    from compquant.evaluation.datasets import calibration_windows, evaluation_tokens
    from compquant.evaluation.perplexity import perplexity_of_tokens

    loaded = compquant.load_model("smollm2-135m")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    windows = calibration_windows(tokenizer, "wikitext2", nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                  data_dir=args.data_dir)
    config = compquant.QuantConfig(solver=args.solver, grid={"bits": 4, "group_size": 128},
                                   calibration={"nsamples": args.nsamples, "seqlen": args.seqlen,
                                                "batch_size": args.batch_size})
    solver_class = type(registry_for(None).get("solver", args.solver))
    with ranks_from_environment(torch.device("cpu")) as ranks:
        barrier = dist.barrier if ranks.world > 1 else None
        with PhaseClocks(solver_class, barrier) as clocks, measure() as timing:
            report = compquant.quantize(model, config, calibration=windows)
        phases = clocks.phases(timing.seconds)
        figures = {"rank": ranks.rank, "wall_seconds": timing.seconds, "peak_rss_mib": timing.peak_rss_bytes / 2**20,
                   "phases": phases}
        if ranks.main:
            torch.save({name: record.codes for name, record in report.records.items()}, Path(args.scratch) / "codes.pt")
    if ranks.main:
        torch.set_num_threads(2)  # the other rank has finished
        test_ids = evaluation_tokens(tokenizer, "wikitext2", data_dir=args.data_dir)
        figures["perplexity"] = perplexity_of_tokens(model, test_ids, dataset="wikitext2", seqlen=args.eval_seqlen,
                                                     limit=args.eval_limit).perplexity
    (Path(args.scratch) / f"rank{ranks.rank}.json").write_text(json.dumps(figures))


def run_layout(args: argparse.Namespace, solver: str, layout: str, scratch: Path) -> dict:
    """One run in fresh processes; its ranks' figures and the codes' path."""
    processes, threads, batch_size = LAYOUTS[layout]
    script = [str(Path(__file__).resolve()), "--worker", "--solver", solver, "--threads", str(threads),
              "--batch-size", str(batch_size),
              "--scratch", str(scratch), *(f"--{key.replace('_', '-')}={value}" for key, value in settings(args).items())]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
                if processes > 1 else [sys.executable])
    started = time.perf_counter()
    subprocess.run([*launcher, *script], check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads),
                                                           "COMPQUANT_NO_PROGRESS": "1"})
    ranks = [json.loads((scratch / f"rank{rank}.json").read_text()) for rank in range(processes)]
    return {"solver": solver, "layout": layout, "processes": processes, "threads": threads, "batch_size": batch_size,
            "machine": machine(),
            "launch_seconds": time.perf_counter() - started, "ranks": ranks, "perplexity": ranks[0]["perplexity"]}


def settings(args: argparse.Namespace) -> dict:
    """What determines the runs' results (a results file is extended only with equal settings)."""
    return {key: getattr(args, key) for key in ("data_dir", "nsamples", "seqlen", "eval_seqlen", "eval_limit")}


def machine() -> dict:
    """What float32 results depend on beyond the code: the CPU (its vector width picks the kernels)
    and the torch build. The same command on another machine of this kind moved GPTQ's perplexity
    from 38.76 to 39.33, as much as the ranks move it, so each run says where it ran."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "unknown")
    return {"cpu": model, "avx512": " avx512f" in cpu, "torch": torch.__version__}


def run_keeping_codes(args: argparse.Namespace, solver: str, layout: str, codes_dir: Path) -> dict:
    """``run_layout`` in a scratch folder, its codes moved to ``codes_dir`` for the comparisons."""
    with tempfile.TemporaryDirectory() as scratch:
        run = run_layout(args, solver, layout, Path(scratch))
        (Path(scratch) / "codes.pt").replace(codes_dir / f"{solver}-{layout}.pt")
    return run


def recover_reference_codes(args: argparse.Namespace, solver: str, done: dict, codes_dir: Path) -> None:
    """Run the one-process reference again for its codes alone, when a resumed table has its row but
    the codes were lost (a temporary folder cleared). The recorded row keeps its timings; the rerun
    must reproduce its perplexity exactly, or the codes would not be the ones that row describes."""
    recorded = next(run for run in done["runs"] if run["solver"] == solver and run["layout"] == "1x2")
    print(f"{solver}: the 1x2 codes are gone from {codes_dir}; running 1x2 again for them", flush=True)
    rerun = run_keeping_codes(args, solver, "1x2", codes_dir)
    if rerun["perplexity"] != recorded["perplexity"]:
        raise SystemExit(f"{solver} 1x2 rerun gave perplexity {rerun['perplexity']} where the table has "
                         f"{recorded['perplexity']}: not the same run; start a new --out")


def differing_codes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The share of integer codes that differ between two runs' records."""
    changed = sum(int((a[name] != b[name]).sum()) for name in a)
    return changed / sum(codes.numel() for codes in a.values())


def changed(run: dict) -> str:
    return f"{100 * run['codes_changed']:.3f}%" if "codes_changed" in run else "(reference)"


def table(done: dict) -> str:
    s = done["settings"]
    lines = [f"SmolLM2-135M W4 g128, calibration {s['nsamples']} x {s['seqlen']} tokens, float32 statistics; evaluation "
             f"{s['eval_limit']} x {s['eval_seqlen']} tokens of WikiText-2 test",
             f"{'solver':<6} {'layout':<6} {'rank':>4} {'wall s':>7} {'peak MiB':>9} "
             + " ".join(f"{phase:>10}" for phase in PhaseClocks.PHASES) + f" {'ppl':>9} {'codes changed':>13}"]
    for run in done["runs"]:
        for figures in run["ranks"]:
            first = figures["rank"] == 0
            lines.append(f"{run['solver']:<6} {run['layout']:<6} {figures['rank']:>4} {figures['wall_seconds']:>7.1f} "
                         f"{figures['peak_rss_mib']:>9.0f} " + " ".join(f"{figures['phases'][p]:>10.1f}" for p in PhaseClocks.PHASES)
                         + (f" {run['perplexity']:>9.4f} {changed(run):>13}" if first else ""))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=40)
    parser.add_argument("--solvers", default="gptq,gptaq")
    parser.add_argument("--out", default="bench/results/ranks_smollm2.json")
    parser.add_argument("--codes-dir", default=str(Path(tempfile.gettempdir()) / "compquant-ranks-codes"),
                        help="where each run's codes are kept for the comparison (too big for the results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--solver", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    from compquant.core.saving import write_text_atomic

    out, codes_dir = Path(args.out), Path(args.codes_dir)
    done = resumed_table(out, settings(args))
    codes_dir.mkdir(parents=True, exist_ok=True)
    for solver in args.solvers.split(","):
        for layout in LAYOUTS:
            if any(run["solver"] == solver and run["layout"] == layout for run in done["runs"]):
                continue
            reference_codes = codes_dir / f"{solver}-1x2.pt"
            if layout != "1x2" and not reference_codes.exists():
                recover_reference_codes(args, solver, done, codes_dir)
            run = run_keeping_codes(args, solver, layout, codes_dir)
            if layout != "1x2":
                run["codes_changed"] = differing_codes(torch.load(reference_codes),
                                                       torch.load(codes_dir / f"{solver}-{layout}.pt"))
            done["runs"].append(run)
            write_text_atomic(out, json.dumps(done, indent=2))
            print(table(done), flush=True)
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
