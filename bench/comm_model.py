"""A model of compquant's calibration on several ranks, from shapes alone (no weights, no run): for
Llama-3 8B, 70B and 405B shapes, per block and per rank, the bytes each rank sends in the
statistics' all-reduces and receives in the row gathers, the time of the forwards, statistics,
solves and collectives, and the predicted speedup for 1 to 64 ranks, with two changes that move
where it stops: reducing the statistics in bfloat16, and sharing the factorization of H among the
ranks (today every rank repeats it, see docs/methods.md §4).

    python bench/comm_model.py --out bench/results/comm_model.json

What the model counts, per block (groups q/k/v, o, gate/up, down; every rank has all the weights):
- forwards: 2 · block parameters · tokens / ranks floating-point operations per stream (GPTQ one,
  GPTAQ two: quantized and full precision), plus attention's 4 · seqlen · hidden per token;
- statistics: 2 · columns² per token and statistic (H; GPTAQ also the cross term), over this
  rank's tokens;
- reductions: a ring all-reduce of every statistic, 2 (p − 1) / p · its bytes sent per rank;
- solves: every rank factorizes H (4/3 · columns³: Cholesky, inverse, Cholesky again; GPTAQ also
  2 · columns³ for its cross term times the factor) and runs the column loop on its 1/p of the
  rows (rows · columns² per pass; GPTAQ two);
- gathers: an all-gather of the solved rows (weights, codes, scales, zeros), (p − 1) / p of the
  bytes received per rank.
Each phase is its operations (or bytes) divided by a rate of the machine, plus a latency per
collective; the phases add up (nothing overlaps). The rates of the `h200` machine are assumptions
taken from the data sheet with an efficiency factor, not measurements, and are written into the
output: rerun with `--machine` values from a measured GPU (bench/gpu_llama8b.py) to replace them.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: blocks, widths and heads (no weights)."""

    blocks: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int

    def groups(self) -> list[tuple[str, int, int]]:
        """(name, stacked rows, columns) of each linear group of one block, in solve order."""
        head_dim = self.hidden // self.heads
        return [("q/k/v", self.hidden + 2 * self.kv_heads * head_dim, self.hidden), ("o", self.hidden, self.hidden),
                ("gate/up", 2 * self.intermediate, self.hidden), ("down", self.hidden, self.intermediate)]

    def block_parameters(self) -> int:
        return sum(rows * columns for _, rows, columns in self.groups())


SHAPES = {
    "llama3-8b": Shape(32, 4096, 14336, 32, 8),
    "llama3-70b": Shape(80, 8192, 28672, 64, 8),
    "llama3-405b": Shape(126, 16384, 53248, 128, 8),
}


@dataclass(frozen=True)
class Machine:
    """Rates of one rank and of the links between ranks. ``ranks_per_node`` ranks share the fast
    link; a collective that spans nodes runs at the slow one."""

    forward_flops: float  # bf16 matmuls of the block forwards
    statistics_flops: float  # float32 X^T X
    factorization_flops: float  # Cholesky and inverse of H, float32
    column_loop_flops: float  # the column updates, float32
    intra_node_bytes_per_s: float  # bus bandwidth of an all-reduce inside a node
    inter_node_bytes_per_s: float  # bus bandwidth of an all-reduce across nodes
    latency_s: float  # per collective
    ranks_per_node: int


MACHINES = {
    # H200 SXM: 989 TFLOP/s dense bf16, 67 TFLOP/s float32 (no TF32: torch's default for matmuls);
    # NVLink 900 GB/s per GPU, NDR InfiniBand 400 Gb/s per GPU. Efficiencies are assumptions.
    "h200": Machine(forward_flops=0.5 * 989e12, statistics_flops=0.7 * 67e12, factorization_flops=0.3 * 67e12,
                    column_loop_flops=0.2 * 67e12, intra_node_bytes_per_s=0.4 * 900e9,
                    inter_node_bytes_per_s=0.8 * 50e9, latency_s=50e-6, ranks_per_node=8),
}


@dataclass(frozen=True)
class Run:
    """What is being calibrated: tokens, statistics and the bytes of what travels."""

    samples: int = 128
    seqlen: int = 2048
    statistics: int = 1  # 1: GPTQ (H); 2: GPTAQ and ResComp (H and the cross term)
    streams: int = 1  # 1: GPTQ; 2: GPTAQ (the full-precision stream beside the quantized one)
    statistic_bytes: int = 4  # float32; 2 with bfloat16 reductions
    shared_factorization: bool = False  # the factorization cut among the ranks instead of repeated
    weight_bytes: int = 2  # the solved weight, gathered in the model's dtype (bf16)
    code_bytes: int = 2  # int16 codes
    group_size: int = 128
    scale_zero_bytes: int = 4  # a bf16 scale and zero point per row and group


def block_phases(shape: Shape, machine: Machine, run: Run, ranks: int) -> dict[str, float]:
    """Seconds of each phase of one block on one rank, and the bytes it moves."""
    tokens = run.samples * run.seqlen / ranks
    forward_ops = run.streams * tokens * (2 * shape.block_parameters() + 4 * run.seqlen * shape.hidden)
    statistics_ops = run.statistics * sum(2 * columns**2 * tokens for _, _, columns in shape.groups())
    per_column = 4 / 3 + 2 * (run.statistics - 1)  # GPTAQ: also the cross term times the inverse factor
    factor_ops = sum(per_column * columns**3 for _, _, columns in shape.groups()) / (ranks if run.shared_factorization else 1)
    loop_ops = run.statistics * sum(rows / ranks * columns**2 for _, rows, columns in shape.groups())
    reduced = run.statistics * sum(columns**2 for _, _, columns in shape.groups()) * run.statistic_bytes
    solved = sum(rows * columns * (run.weight_bytes + run.code_bytes)
                 + rows * (columns // run.group_size) * run.scale_zero_bytes for _, rows, columns in shape.groups())
    sent = 2 * (ranks - 1) / ranks * reduced
    received = (ranks - 1) / ranks * solved
    bandwidth = machine.intra_node_bytes_per_s if ranks <= machine.ranks_per_node else machine.inter_node_bytes_per_s
    latency = machine.latency_s * len(shape.groups()) if ranks > 1 else 0.0  # per group: a collective per tensor
    return {"forwards": forward_ops / machine.forward_flops, "statistics": statistics_ops / machine.statistics_flops,
            "factorization": factor_ops / machine.factorization_flops, "column loop": loop_ops / machine.column_loop_flops,
            "reductions": sent / bandwidth + run.statistics * latency,
            "gathers": received / bandwidth + 4 * latency,  # weights, codes, scales, zeros
            "reduced MB sent": sent / 1e6, "gathered MB received": received / 1e6}


TIMES = ("forwards", "statistics", "factorization", "column loop", "reductions", "gathers")


def curve(shape: Shape, machine: Machine, run: Run, ranks: list[int]) -> list[dict]:
    rows = []
    for p in ranks:
        phases = block_phases(shape, machine, run, p)
        total = shape.blocks * sum(phases[name] for name in TIMES)
        rows.append({"ranks": p, **phases, "model seconds": total})
    for row in rows:
        row["speedup"] = rows[0]["model seconds"] / row["model seconds"]
        row["communication share"] = (row["reductions"] + row["gathers"]) / (row["model seconds"] / shape.blocks)
    return rows


def stops_scaling(rows: list[dict]) -> int:
    """The first rank count whose doubling gains less than 10 % (the knee of the curve)."""
    for this, doubled in zip(rows, rows[1:]):
        if doubled["speedup"] < 1.1 * this["speedup"]:
            return this["ranks"]
    return rows[-1]["ranks"]


def summary(result: dict) -> str:
    """One line per shape and solver: the traffic per block and rank at 8 ranks, the predicted time
    on one rank, the speedups, and the speedup at the most ranks with each change."""
    lines = ["shape        solver  reduce/gather GB at 8  1 rank s   8 ranks  16 ranks  most ranks  comm %  "
             "bf16 red.  shared fact.  both"]
    for name, model in result["models"].items():
        for solver, curves in model["solvers"].items():
            rows = {row["ranks"]: row for row in curves["as built"]}
            eight, last = rows.get(8, rows[max(rows)]), curves["as built"][-1]
            lines.append(f"{name:<12} {solver:<6} {eight['reduced MB sent'] / 1e3:>9.2f} / {eight['gathered MB received'] / 1e3:<8.2f}"
                         f" {rows[min(rows)]['model seconds']:>9.0f} {eight['speedup']:>8.2f}x"
                         f" {rows.get(16, last)['speedup']:>8.2f}x {last['speedup']:>10.2f}x {100 * last['communication share']:>6.0f}"
                         + "".join(f" {curves[change][-1]['speedup']:>10.1f}x" for change in ("bf16 reductions",
                                                                                      "shared factorization", "both")))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default="h200", choices=sorted(MACHINES))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64")
    parser.add_argument("--out", help="also write every row to this JSON file")
    args = parser.parse_args()
    machine = MACHINES[args.machine]
    ranks = [int(p) for p in args.ranks.split(",")]
    variants = {"GPTQ": Run(args.samples, args.seqlen),
                "GPTAQ": Run(args.samples, args.seqlen, statistics=2, streams=2)}
    changes = {"as built": {}, "bf16 reductions": {"statistic_bytes": 2},
               "shared factorization": {"shared_factorization": True},
               "both": {"statistic_bytes": 2, "shared_factorization": True}}
    result = {"machine": {args.machine: asdict(machine)}, "tokens": args.samples * args.seqlen, "models": {}}
    for name, shape in SHAPES.items():
        result["models"][name] = {"shape": asdict(shape), "solvers": {}}
        for label, run in variants.items():
            curves = {change: curve(shape, machine, replace(run, **fields), ranks) for change, fields in changes.items()}
            result["models"][name]["solvers"][label] = curves
            print(f"\n{name} {label} ({args.samples} x {args.seqlen} tokens, machine {args.machine}); per block and rank:")
            print(f"{'ranks':>5} {'reduce MB':>10} {'gather MB':>10} " + " ".join(f"{t:>13}" for t in TIMES)
                  + f" {'model s':>9} {'speedup':>8} {'comm %':>7}")
            for row in curves["as built"]:
                print(f"{row['ranks']:>5} {row['reduced MB sent']:>10.0f} {row['gathered MB received']:>10.0f} "
                      + " ".join(f"{row[t]:>13.3f}" for t in TIMES)
                      + f" {row['model seconds']:>9.1f} {row['speedup']:>8.2f} {100 * row['communication share']:>6.1f}%")
            for change, rows in curves.items():
                print(f"  {change:<21} speedup at {ranks[-1]} ranks {rows[-1]['speedup']:5.1f}x; "
                      f"doubling gains < 10 % beyond {stops_scaling(rows)} ranks")
    print("\n" + summary(result))
    if args.out:
        from compquant.core.saving import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
