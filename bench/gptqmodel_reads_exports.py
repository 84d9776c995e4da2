"""GPTQModel reads compquant's GPTQ exports of SmolLM2-135M back to the same logits as compquant's
own reader: W3 and W4, with and without act-order, `gptq` (v1, symmetric: GPTQModel takes
asymmetric v1 only from its own producer) and `gptq-v2` (asymmetric), groups of 64.

Each row quantizes a copy of the model with GPTQ on the same calibration windows, exports it with
float16 scales (GPTQModel's pure-torch CPU kernel holds float16 or bfloat16), loads the folder
twice, with `compquant.load_model` (de-quantized to float32) and with `GPTQModel.load(...,
backend=BACKEND.TORCH, device="cpu")` cast to float32, and compares the logits and the WikiText-2
perplexity of the same test windows. Rows are written to the JSON output as they finish; a rerun
skips finished rows.

Runs in GPTQModel's environment (not a compquant dependency; docs/results.md says how it is built):

    PYTHONPATH=<parent of compquant> /work/venv-gptqmodel/bin/python bench/gptqmodel_reads_exports.py \\
        --data-dir ../shared/data --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import compquant
from compquant.evaluation.datasets import calibration_windows, evaluation_tokens

ROWS = [(bits, act_order, fmt, sym) for bits in (4, 3) for act_order in (False, True)
        for fmt, sym in (("gptq", True), ("gptq-v2", False))]


def nll_and_logits(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean next-token NLL over ``windows`` and the logits of the first window."""
    losses, first = [], None
    with torch.inference_mode():
        for window in windows:
            logits = model(window[None], use_cache=False).logits.float()
            first = logits if first is None else first
            losses.append(F.cross_entropy(logits[0, :-1], window[1:]).item())
    return sum(losses) / len(losses), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gptqmodel_reads_exports.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import gptqmodel

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    results.update({"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "group_size": args.group_size,
                    "eval_windows": args.eval_windows, "gptqmodel": gptqmodel.__version__,
                    "torch": torch.__version__, "threads": args.threads})
    loaded = compquant.load_model(args.model)
    windows = calibration_windows(loaded.tokenizer, "wikitext2", nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                  data_dir=args.data_dir)
    test = evaluation_tokens(loaded.tokenizer, "wikitext2", data_dir=args.data_dir)[0]
    test = test[: args.eval_windows * args.seqlen].reshape(args.eval_windows, args.seqlen)
    for bits, act_order, fmt, sym in ROWS:
        key = f"W{bits} {'act-order' if act_order else 'plain'} {fmt} {'sym' if sym else 'asym'}"
        if key in results["rows"]:
            print(f"{key}: done before, {results['rows'][key]}", flush=True)
            continue
        model = copy.deepcopy(loaded.model)
        config = compquant.QuantConfig(solver="gptq", grid={"bits": bits, "group_size": args.group_size, "sym": sym},
                                       solver_options={"act_order": act_order})
        started = time.perf_counter()
        report = compquant.quantize(model, config, calibration=windows)
        quantize_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as scratch:
            folder = compquant.save_quantized(model, loaded.tokenizer, Path(scratch) / "export", config=config,
                                              report=report, format=fmt, dtype=torch.float16)
            del model
            ours_nll, ours = nll_and_logits(compquant.load_model(str(folder)).model.eval(), test)
            theirs_model = gptqmodel.GPTQModel.load(str(folder), backend=gptqmodel.BACKEND.TORCH, device="cpu",
                                                    dtype=torch.float16).model.float().eval()
            theirs_nll, theirs = nll_and_logits(theirs_model, test)
            del theirs_model
        row = {"max_abs_logit_diff": (theirs - ours).abs().max().item(),
               "max_abs_logit": ours.abs().max().item(),
               "ppl_compquant": math.exp(ours_nll), "ppl_gptqmodel": math.exp(theirs_nll),
               "quantize_s": round(quantize_s, 1)}
        results["rows"][key] = row
        out.write_text(json.dumps(results, indent=2))
        print(f"{key}: {row}", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
