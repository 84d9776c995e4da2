"""auto-round's side of `bench/vs_autoround.py`: its signed-gradient rounding (`AutoRound`, the
SignRound algorithm) on the CPU, from the same full-precision folder and calibration token ids as
compquant's learners, at the same bits and group size, asymmetric.

Runs in auto-round's own virtual environment (its pins are not compquant's) and imports only
auto_round, transformers, torch, the standard library and the bench's `peer_common.py` and
`process_memory.py`, never compquant.

    <venv>/bin/python bench/peer_autoround.py --model-dir FP --calibration TOKENS.pt --bits 3 \\
        --group-size 128 --iters 16 --batch-size 1 --threads 1 --output OUT --result OUT.json

Writes the model with its weights rounded onto auto-round's grid (dense float32, what
`AutoRound.quantize` leaves in memory) to ``--output``, moved into place only when complete, and,
last, ``--result``: quantization wall time, peak RSS and versions. auto-round 0.16.1's own
`format="fake"` export was not used: on this float32 model it wrote the original weights back
(its log: "Restored ... from FP16/BF16 to their original FP32 values") and no quantization config.
Before anything is written, every quantized layer is checked to hold at most 2**bits distinct
values in each group of a row (the result records the most found). auto-round's own defaults are
kept: on this CPU it tunes in bfloat16 autocast and under torch.compile, whose cache makes a
second run faster than the first.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from peer_common import peer_parser, save_atomically, start, write_result  # bench/peer_common.py, beside this script
from process_memory import rss_mib

if TYPE_CHECKING:
    import torch

VERSIONED = ("torch", "transformers", "auto-round", "accelerate")


def most_levels_per_group(model: torch.nn.Module, layers: list[str], group_size: int) -> int:
    """The most distinct values in any group of any quantized layer's rows: at most 2**bits when the
    weights in memory lie on auto-round's grid, which is checked before anything is written."""
    most = 0
    for name in layers:
        weight = model.get_submodule(name).weight.detach().float()
        for group in weight.split(group_size, dim=1):  # the last group is short where 128 does not divide
            ordered = group.sort(dim=-1).values
            most = max(most, int((1 + (ordered.diff(dim=-1) != 0).sum(dim=-1)).max()))
    return most


def main() -> int:
    parser = peer_parser(__doc__, gptq=False)
    parser.add_argument("--iters", type=int, required=True, help="auto-round's tuning steps per block")
    args = parser.parse_args()

    output, tokens, started = start(args)
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    loaded = time.perf_counter()
    rss_loaded = rss_mib("VmRSS")
    rounder = AutoRound(model, tokenizer=tokenizer, scheme=f"W{args.bits}A16", bits=args.bits,
                        group_size=args.group_size, sym=False, dataset=[window[None] for window in tokens],
                        nsamples=tokens.shape[0], seqlen=tokens.shape[1], iters=args.iters,
                        batch_size=args.batch_size, device_map="cpu", seed=0)
    quantized_model, layer_config = rounder.quantize()
    quantized = time.perf_counter()
    peak_after_quantize = rss_mib()
    layers = [name for name, config in layer_config.items() if config.get("bits", 16) < 16]
    levels = most_levels_per_group(quantized_model, layers, args.group_size)
    if not layers or levels > 2**args.bits:
        raise SystemExit(f"auto-round left {len(layers)} quantized layers with up to {levels} distinct values in a "
                         f"group of {args.group_size}, more than {2**args.bits}: its weights are not on the grid")

    save_atomically(output, quantized_model, tokenizer)
    write_result(args.result, "auto-round", VERSIONED, (started, loaded, quantized), rss_loaded, peak_after_quantize,
                 torch.get_num_threads(), iters=args.iters,
                 quantized_layers=len(layers), most_levels_per_group=levels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
