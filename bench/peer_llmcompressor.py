"""llm-compressor's side of `bench/vs_llmcompressor.py`: its `GPTQModifier` through `oneshot`, on
the CPU, from the same full-precision folder and the same calibration token ids as compquant's side.

llm-compressor pins older torch and transformers than compquant uses, so this file runs in its own
virtual environment (built by `vs_llmcompressor.py`) and imports only llmcompressor, transformers,
torch, datasets, the standard library and `process_memory.py` beside it (standard library only),
never compquant.

    <venv>/bin/python bench/peer_llmcompressor.py --model-dir FP --calibration TOKENS.pt --bits 4 \\
        --group-size 64 --percdamp 0.01 --blocksize 128 --batch-size 8 --threads 2 \\
        --output OUT --result OUT.json

Writes the quantized model to ``--output`` (compressed-tensors format, moved into place only when
complete) and, last, ``--result``: quantization wall time, peak RSS and versions.
"""
from __future__ import annotations

import argparse
import sys
import time

from peer_common import peer_parser, save_atomically, start, write_result  # bench/peer_common.py, beside this script
from process_memory import rss_mib

VERSIONED = ("torch", "transformers", "llmcompressor", "compressed-tensors", "datasets", "accelerate")


def recipe(args: argparse.Namespace):
    """GPTQ with compquant's settings: asymmetric integer groups, static act order (groups fixed
    from the original weights in column order, columns visited by decreasing diag(H)); every Linear
    of the decoder layers, lm_head left alone as compquant leaves it."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = {
        "num_bits": args.bits,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": args.group_size,
        "actorder": "static",
    }
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        block_size=args.blocksize,
        dampening_frac=args.percdamp,
        actorder="static",
    )


def main() -> int:
    parser = peer_parser(__doc__)
    parser.add_argument("--blocksize", type=int, required=True)
    parser.add_argument("--sequential-targets", default=None,
                        help="comma-separated module classes or names that end a calibration subgraph (default: "
                             "llm-compressor's choice, the decoder layer); 'Linear' makes it true-sequential, "
                             "every linear calibrated on the outputs of the already quantized ones, as compquant is")
    parser.add_argument("--save-decompressed", action="store_true",
                        help="save dense fake-quantized weights instead of the compressed-tensors packing")
    args = parser.parse_args()

    output, tokens, started = start(args)
    import torch

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    nsamples, seqlen = tokens.shape
    # The windows are complete sequences of equal length: every token is attended, no padding.
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    loaded = time.perf_counter()
    rss_loaded = rss_mib("VmRSS")
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe(args),
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,  # same windows in the same order as compquant's side
        pipeline="sequential",
        sequential_targets=args.sequential_targets.split(",") if args.sequential_targets else None,
    )
    quantized = time.perf_counter()
    peak_after_quantize = rss_mib()
    layers = sorted(name for name, module in model.named_modules()
                    if getattr(getattr(module, "quantization_scheme", None), "weights", None) is not None)

    save_atomically(output, model, tokenizer, save_compressed=not args.save_decompressed)
    write_result(args.result, "llmcompressor", VERSIONED, (started, loaded, quantized), rss_loaded, peak_after_quantize,
                 torch.get_num_threads(), quantized_layers=len(layers), saved_compressed=not args.save_decompressed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
