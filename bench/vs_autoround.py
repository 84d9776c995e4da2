"""auto-round beside compquant's learners on SmolLM2-135M: WikiText-2 test perplexity, quantization
wall time and peak RSS of auto-round's SignRound at W3 and W2 g128 asymmetric, on the calibration
windows of bench/solvers_smollm2.py's table (8 x 512 WikiText-2 validation tokens per seed, the same
ids, handed over as a tensor) and scored by the same perplexity code on 16 x 512 test tokens.

auto-round runs in a virtual environment of its own (`--peer-python`; built once with
`python -m venv --system-site-packages` and `pip install auto-round==0.16.1`, which keeps the project's
torch) through `bench/peer_autoround.py`, one process per run. By default it tunes each block for
16 steps of one window, the work of compquant's learners in the learned table (2 epochs of 8
one-window steps); `--iters 200` is auto-round's own default. Each finished run is written to the
JSON output at once; a rerun skips finished runs.

    python bench/vs_autoround.py --data-dir ../shared/data --peer-python /work/venv-autoround/bin/python
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from common import resumed_table  # bench/common.py, beside this script
from vs_llmcompressor import prepare_inputs, run_logged  # bench/vs_llmcompressor.py, beside this script

PEER_SCRIPT = Path(__file__).resolve().with_name("peer_autoround.py")
SETTINGS = ("nsamples", "seqlen", "eval_seqlen", "eval_limit", "iters", "batch_size", "threads")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=16)
    parser.add_argument("--bits", default="3,2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peer-python", default="/work/venv-autoround/bin/python")
    parser.add_argument("--work", default="/tmp/compquant-vs-autoround", help="the fp folder, ids and outputs")
    parser.add_argument("--out", default="bench/results/autoround_smollm2.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    import compquant
    from compquant.core.saving import write_text_atomic
    from compquant.evaluation.datasets import evaluation_tokens
    from compquant.evaluation.perplexity import perplexity_of_tokens

    out, work = Path(args.out), Path(args.work)
    settings = {key: getattr(args, key) for key in SETTINGS}
    done = resumed_table(out, settings)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = compquant.load_model(args.model).tokenizer
    test_ids = evaluation_tokens(tokenizer, "wikitext2", data_dir=args.data_dir)
    for seed in (int(s) for s in args.seeds.split(",")):
        for bits in (int(b) for b in args.bits.split(",")):
            label = f"asym W{bits} g128 auto-round"
            if any(run["label"] == label and run["seed"] == seed for run in done["runs"]):
                continue
            fp, tokens = prepare_inputs(argparse.Namespace(**{**vars(args), "seed": seed}), work)
            output, result = work / f"autoround-w{bits}-s{seed}", work / f"autoround-w{bits}-s{seed}.json"
            shutil.rmtree(output, ignore_errors=True)
            run_logged([args.peer_python, str(PEER_SCRIPT), "--model-dir", str(fp), "--calibration", str(tokens),
                        "--bits", str(bits), "--group-size", "128", "--iters", str(args.iters),
                        "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                        "--output", str(output), "--result", str(result)], work / "autoround.log")
            peer = json.loads(result.read_text())
            model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
            ppl = perplexity_of_tokens(model, test_ids, dataset="wikitext2", seqlen=args.eval_seqlen,
                                       limit=args.eval_limit).perplexity
            shutil.rmtree(output)
            done["runs"].append({"label": label, "seed": seed, "perplexity": ppl, **peer})
            write_text_atomic(out, json.dumps(done, indent=2))
            print(f"{label} seed {seed}: ppl {ppl:.3f}, {peer['quantize_seconds']:.1f} s, "
                  f"peak {peer['peak_rss_mib']:.0f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
