"""Every solver on SmolLM2-135M: WikiText-2 test perplexity, wall time and peak RSS of RTN, GPTQ,
GPTAQ, ResComp(GPTQ) and ResComp(GPTAQ) at W4/W3/W2 g128 asymmetric, each on several calibration
seeds, plus the released ResComp recipe's settings (symmetric, clip search, act_order), optionally
after each transform (QuaRot, SpinQuant), with the time the transform took; and with `--learners`,
each learner (docs/learners.md) trained on every block before each solver quantizes it, with the
learners' training time per block (bench/learners_smollm2.sh runs that table).

One process, one model load; each finished run is appended to the JSON output at once, so a killed
run resumes where it stopped (runs already in the file are skipped). Calibration uses WikiText-2
validation text, never the test split.

    python bench/solvers_smollm2.py --data-dir ../shared/data --threads 1 --out bench/results/solvers_smollm2.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import compquant
from common import LEARNERS, SOLVERS, learner_of  # bench/common.py, beside this script
from compquant.core.measure import measure
from compquant.core.saving import write_text_atomic
from compquant.evaluation.datasets import calibration_windows, evaluation_tokens
from compquant.evaluation.perplexity import perplexity_of_tokens

# Which runs to do: a results file can be extended with more of them; every other setting changes the
# runs' results and must match the file's.
SELECTION = {"bits", "recipe_bits", "seeds", "solvers", "transforms", "learners", "out"}
# Settings of the learned runs only: a file without learned runs takes them on.
LEARNING = {"learner_epochs", "learner_batch"}


def runs(bits: list[int], seeds: list[int], recipe_bits: list[int], solvers: list[str], transforms: list[str],
         learners: list[str]):
    """(label, solver, solver options, grid, transform, learner spec or None, seed) for the whole
    table; learned runs seed by seed, so that a table cut short has every configuration's first
    seed."""
    if learners:
        for seed in seeds:
            for b in bits:
                for transform in transforms:
                    for spec in learners:
                        for label in solvers:
                            solver, options = SOLVERS[label]
                            learner = None if spec == "none" else spec
                            method = f"{learner}+{label}" if learner else label
                            name = f"asym W{b} g128 {method}" + ("" if transform == "none" else f" +{transform}")
                            yield name, solver, options, {"bits": b, "group_size": 128}, transform, learner, seed
        return
    for setting, bit_list in (("asym", bits), ("recipe", recipe_bits)):
        for b in bit_list:
            for transform in transforms:
                for label in solvers:
                    solver, options = SOLVERS[label]
                    grid = {"bits": b, "group_size": 128, "sym": setting == "recipe", "clip": setting == "recipe"}
                    if setting == "recipe" and solver != "rtn":
                        options = {**options, "act_order": True}
                    name = f"{setting} W{b} g128 {label}" + ("" if transform == "none" else f" +{transform}")
                    for seed in seeds if solver != "rtn" or transform == "spinquant" else seeds[:1]:
                        yield name, solver, options, grid, transform, None, seed


class TransformClock:
    """Records when calibration starts, so the transforms' share of a run can be reported."""

    def __init__(self) -> None:
        self.started = 0.0

    @compquant.hookimpl
    def compquant_before_calibration(self, model, adapter, config) -> None:
        self.started = time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=16)
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--recipe-bits", default="3,2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--solvers", default=",".join(SOLVERS), help=f"labels from {list(SOLVERS)}")
    parser.add_argument("--transforms", default="none", help="none, quarot, spinquant (comma-separated)")
    parser.add_argument("--learners", default="", help=f"labels from {list(LEARNERS)}, each optionally with "
                        "options of its own (sde:band=4:lookahead=2), or none (the solver alone, the "
                        "baseline in the same file); every one before every solver")
    parser.add_argument("--learner-epochs", type=int, default=2)
    parser.add_argument("--learner-batch", type=int, default=1, help="windows per training step of a learner")
    parser.add_argument("--spinquant-steps", type=int, default=20)
    parser.add_argument("--spinquant-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/solvers_smollm2.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings = {key: value for key, value in vars(args).items() if key not in SELECTION}
    done = json.loads(out.read_text()) if out.exists() else {"settings": settings, "runs": []}
    recorded = {key: value for key, value in done["settings"].items() if key not in SELECTION}
    if not any("learner" in run for run in done["runs"]):
        recorded.update({key: settings[key] for key in LEARNING})
    if recorded != settings:
        changed = sorted(key for key in settings.keys() | recorded.keys() if settings.get(key) != recorded.get(key))
        print(f"{out} was written with other settings ({', '.join(changed)}); use those or another --out", file=sys.stderr)
        return 2
    done["settings"] = settings

    loaded = compquant.load_model(args.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    test_ids = evaluation_tokens(tokenizer, "wikitext2", data_dir=args.data_dir)

    def evaluate(m):
        return perplexity_of_tokens(m, test_ids, dataset="wikitext2", seqlen=args.eval_seqlen, limit=args.eval_limit)

    if not any(run["label"] == "fp" for run in done["runs"]):
        with measure() as timing:
            fp = evaluate(model)
        done["runs"].append({"label": "fp", "seed": None, "perplexity": fp.perplexity, "eval_seconds": timing.seconds})
        write_text_atomic(out, json.dumps(done, indent=2))
    bits = [int(b) for b in args.bits.split(",") if b]
    recipe_bits = [int(b) for b in args.recipe_bits.split(",") if b]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    solvers = [label for label in args.solvers.split(",") if label]
    transforms = [name for name in args.transforms.split(",") if name]
    learners = [spec for spec in args.learners.split(",") if spec]
    for spec in learners:
        if spec != "none":
            learner_of(spec)  # an unknown label stops the table before any run
    clock = TransformClock()
    plugin_manager = compquant.create_plugin_manager()
    plugin_manager.register(clock)
    for label, solver, options, grid, transform, spec, seed in runs(bits, seeds, recipe_bits, solvers, transforms,
                                                                    learners):
        if any(run["label"] == label and run["seed"] == seed for run in done["runs"]):
            continue
        transform_options = {"spinquant": {"steps": args.spinquant_steps, "batch_size": args.spinquant_batch}}
        learning = {}
        if spec is not None:
            learner, learner_options = learner_of(spec)
            learning = {"learner": learner, "learner_options": {"epochs": args.learner_epochs, **learner_options}}
        config = compquant.QuantConfig(solver=solver, solver_options=options, grid=grid, seed=seed,
                                       transforms=[] if transform == "none" else [transform],
                                       transform_options={transform: transform_options[transform]} if transform in transform_options else {},
                                       calibration={"nsamples": args.nsamples, "seqlen": args.seqlen,
                                                    **({"batch_size": args.learner_batch} if learning else {})},
                                       **learning)
        windows = calibration_windows(tokenizer, "wikitext2", nsamples=args.nsamples, seqlen=args.seqlen, seed=seed,
                                      data_dir=args.data_dir)
        quantized = copy.deepcopy(model)
        started = time.perf_counter()
        with measure() as timing:
            report = compquant.quantize(quantized, config, calibration=windows, plugin_manager=plugin_manager)
        ppl = evaluate(quantized)
        del quantized
        done["runs"].append({"label": label, "seed": seed, "perplexity": ppl.perplexity, "quantize_seconds": timing.seconds,
                             "transform_seconds": clock.started - started, "peak_rss_mib": timing.peak_rss_bytes / 2**20,
                             "mean_relative_error": report.mean_relative_error,
                             **({"learner": spec, "learning_seconds_per_block": statistics.mean(
                                 block.seconds for block in report.blocks),
                                 "block_losses": [block.losses for block in report.blocks]} if learning else {})})
        write_text_atomic(out, json.dumps(done, indent=2))
        print(f"{label:<40} seed {seed}: ppl {ppl.perplexity:9.3f}  {timing.seconds:7.1f} s", flush=True)
    print(table(done))
    return 0


def table(done: dict) -> str:
    """Mean, spread (min–max over seeds) and time per configuration, in run order."""
    groups: dict[str, list[dict]] = {}
    for run in done["runs"]:
        groups.setdefault(run["label"], []).append(run)
    s = done["settings"]
    lines = [f"calibration {s['nsamples']} x {s['seqlen']} tokens of WikiText-2 validation; evaluation {s['eval_limit']} x "
             f"{s['eval_seqlen']} tokens of WikiText-2 test; {s['threads']} thread(s)",
             f"{'configuration':<40} {'ppl mean':>9} {'min':>9} {'max':>9} {'n':>2} {'quantize s':>11} {'transform s':>12} {'peak MiB':>9}"
             f" {'learn s/block':>13}"]
    for label, group in groups.items():
        values = [run["perplexity"] for run in group]
        seconds = statistics.mean(run.get("quantize_seconds", 0.0) for run in group)
        transform = statistics.mean(run.get("transform_seconds", 0.0) for run in group)
        peak = max(run.get("peak_rss_mib", 0.0) for run in group)
        learning = [run["learning_seconds_per_block"] for run in group if "learning_seconds_per_block" in run]
        lines.append(f"{label:<40} {statistics.mean(values):>9.3f} {min(values):>9.3f} {max(values):>9.3f} "
                     f"{len(values):>2} {seconds:>11.1f} {transform:>12.1f} {peak:>9.0f}"
                     + (f" {statistics.mean(learning):>13.2f}" if learning else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
