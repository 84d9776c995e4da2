"""How far the main job's GPTQ perplexity moves with the calibration seed, with and without
act-order: SmolLM2-135M, W3 g128 asymmetric, 128 × 512 WikiText-2 validation tokens per seed,
perplexity on 64 × 512 WikiText-2 test tokens (the sizes of `compquant compare`). One model load;
each finished run is appended to the JSON output at once, so a killed run resumes.

    python bench/main_job_seeds.py --data-dir ../shared/data --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

import compquant
from compquant.core.saving import write_text_atomic
from compquant.evaluation.datasets import calibration_windows, evaluation_tokens
from compquant.evaluation.perplexity import perplexity_of_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("bench/results/main_job_seeds.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    loaded = compquant.load_model("smollm2-135m")
    test = evaluation_tokens(loaded.tokenizer, "wikitext2", data_dir=args.data_dir)

    def evaluate(model) -> float:
        return perplexity_of_tokens(model, test, dataset="wikitext2", seqlen=512, limit=64).perplexity

    if "fp" not in results:
        results["fp"] = evaluate(loaded.model)
        write_text_atomic(args.out, json.dumps(results, indent=2))
    for act_order in (False, True):
        for seed in map(int, args.seeds.split(",")):
            key = f"gptq act_order={act_order} seed={seed}"
            if key in results:
                continue
            windows = calibration_windows(loaded.tokenizer, "wikitext2", nsamples=128, seqlen=512, seed=seed,
                                          data_dir=args.data_dir)
            config = compquant.QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 128}, seed=seed,
                                           solver_options={"act_order": act_order},
                                           calibration={"nsamples": 128, "seqlen": 512})
            model = copy.deepcopy(loaded.model)
            compquant.quantize(model, config, calibration=windows)
            results[key] = evaluate(model)
            print(f"{key}: {results[key]:.3f}", flush=True)
            write_text_atomic(args.out, json.dumps(results, indent=2))
            del model
    print(f"fp: {results['fp']:.3f}")
    for act_order in (False, True):
        values = [value for key, value in results.items() if key.startswith(f"gptq act_order={act_order} ")]
        if values:
            print(f"act_order={act_order}: mean {statistics.mean(values):.2f}, min {min(values):.2f}, "
                  f"max {max(values):.2f} over {len(values)} seeds")


if __name__ == "__main__":
    main()
