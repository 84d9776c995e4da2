"""The tables of docs/results.md "Learners on SmolLM2", in Markdown, from the files that
bench/learners_smollm2.sh writes: per configuration the mean perplexity over the seeds present, each
seed's perplexity, how many seeds, the mean quantize time and the mean training time per block.
auto-round's rows at the same bits join the tables without a transform, so that the docs print what
the JSON holds rather than figures copied by hand.

    python bench/learners_table.py
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# (heading, results file, bits of the auto-round rows to add or None)
TABLES = [
    ("W3 g128", "learners_smollm2_w3.json", 3),
    ("W2 g128", "learners_smollm2_w2.json", 2),
    ("W2 g128 after QuaRot", "learners_smollm2_w2_quarot.json", None),
    ("The band and look-ahead sweep, and ten times the clipping rate (W3 g128)", "learners_smollm2_sweep.json", None),
]


def configuration(run: dict) -> str:
    """The label without the grid and the transform, with the learner and the solver spaced apart."""
    label = run["label"].split(" g128 ", 1)[1].split(" +", 1)[0]
    if "learner" in run:
        learner, solver = label.rsplit("+", 1)
        return f"{learner} + {solver}"
    return "auto-round (SignRound)" if run.get("tool") == "auto-round" else label


def perplexity(value: float) -> str:
    return f"{value:.1f}" if value >= 1e3 else f"{value:.3f}"


def markdown(runs: list[dict]) -> str:
    """One row per configuration, in the order the runs first appear."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        if run["label"] != "fp":
            groups.setdefault(configuration(run), []).append(run)
    seeds = sorted({run["seed"] for group in groups.values() for run in group})
    lines = [f"| configuration | mean | seed {' / '.join(map(str, seeds))} | n | quantize s | learn s/block |",
             "|---|---|---|---|---|---|"]
    for name, group in groups.items():
        by_seed = {run["seed"]: run["perplexity"] for run in group}
        cells = " / ".join(perplexity(by_seed[seed]) if seed in by_seed else "–" for seed in seeds)
        learning = [run["learning_seconds_per_block"] for run in group if "learning_seconds_per_block" in run]
        quantize = statistics.mean(run["quantize_seconds"] for run in group)
        lines.append(f"| {name} | {perplexity(statistics.mean(by_seed.values()))} | {cells} | {len(by_seed)} | "
                     f"{quantize:.0f} | {f'{statistics.mean(learning):.2f}' if learning else '–'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    autoround_file = args.results / "autoround_smollm2.json"
    autoround = json.loads(autoround_file.read_text())["runs"] if autoround_file.exists() else []
    for heading, name, autoround_bits in TABLES:
        path = args.results / name
        if not path.exists():
            continue
        runs = json.loads(path.read_text())["runs"]
        runs += [run for run in autoround if autoround_bits and run["label"].startswith(f"asym W{autoround_bits} ")]
        print(f"**{heading}**\n\n{markdown(runs)}\n")


if __name__ == "__main__":
    main()
