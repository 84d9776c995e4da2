"""Do the exports of a real model reload with the perplexity the quantized model had in memory?
One GPTQ run (symmetric, so that every format can express it), saved in every format; each export
is read back by plain transformers where it can be (compressed-tensors, fake) and by
`compquant.load_model` (all four), and scored on the same WikiText-2 test windows.

    python bench/exports_reload.py --model gemma3-270m --data-dir ../shared/data --threads 2
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import compquant
from compquant.core.saving import write_text_atomic
from compquant.evaluation.datasets import calibration_windows, evaluation_tokens
from compquant.evaluation.perplexity import perplexity_of_tokens

FORMATS = ("compressed-tensors", "gptq", "gptq-v2", "fake")
PLAIN_TRANSFORMERS = ("compressed-tensors", "fake")  # the formats transformers reads without another package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--eval-limit", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/exports_reload.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = compquant.load_model(args.model)
    test = evaluation_tokens(loaded.tokenizer, "wikitext2", data_dir=args.data_dir)

    def score(model: torch.nn.Module) -> float:
        return perplexity_of_tokens(model.eval(), test, dataset="wikitext2", seqlen=512,
                                    limit=args.eval_limit).perplexity

    config = compquant.QuantConfig(solver="gptq", grid={"bits": args.bits, "group_size": args.group_size, "sym": True},
                                   calibration={"nsamples": args.nsamples, "seqlen": 512})
    windows = calibration_windows(loaded.tokenizer, "wikitext2", nsamples=args.nsamples, seqlen=512, seed=0,
                                  data_dir=args.data_dir)
    report = compquant.quantize(loaded.model, config, calibration=windows)
    rows = {"in memory": score(loaded.model)}
    print(f"{args.model} GPTQ W{args.bits} g{args.group_size} sym: in memory {rows['in memory']:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for format in FORMATS:
            folder = Path(scratch) / format
            compquant.save_quantized(loaded.model, loaded.tokenizer, folder, config=config, report=report,
                                     format=format)
            readers = {"compquant.load_model": lambda: compquant.load_model(str(folder)).model}
            if format in PLAIN_TRANSFORMERS:
                readers["transformers"] = lambda: AutoModelForCausalLM.from_pretrained(folder)
            for reader, load in readers.items():
                rows[f"{format}, {reader}"] = score(load())
                print(f"  {format:<20} read by {reader:<22} {rows[f'{format}, {reader}']:.3f}", flush=True)
    write_text_atomic(args.out, json.dumps({"model": args.model, "bits": args.bits, "group_size": args.group_size,
                                            "nsamples": args.nsamples, "eval_limit": args.eval_limit,
                                            "perplexity": rows}, indent=2))


if __name__ == "__main__":
    main()
