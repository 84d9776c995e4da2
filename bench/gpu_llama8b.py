"""GPTQ on a Llama-3-8B-shaped model with random weights, built on the GPU (nothing is copied to the
machine): 32 blocks, hidden 4096, intermediate 14336, 32 heads of which 8 key/value, vocabulary
128256, bfloat16, W4 g128, random calibration token ids. One process, one GPU. Prints the wall
time of `compquant.quantize`, where it went (block forwards, statistics, solves), the GPU's peak
memory, and the seconds per block, beside llm-compressor's published 745 s for Llama-3-8B GPTQ on
one GPU (its calibration set, not random ids; the shapes and so the work per token are the same).

    python bench/gpu_llama8b.py --out bench/results/gpu_llama8b.json            # a CUDA machine
    python bench/gpu_llama8b.py --device cpu --blocks 2 --hidden 64 --intermediate 128 --heads 4 \\
        --kv-heads 2 --vocab 512 --samples 8 --seqlen 32                        # the script itself, here

Run the CUDA tests first (`python -m pytest -m cuda tests`): bench/gpu_check.sh does both within a
time limit. The weights are random, so there is no perplexity to report: the figures are of time and
memory only, which do not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import compquant
from common import PhaseClocks  # bench/common.py, beside this script
from compquant.core.measure import measure
from compquant.core.plugin_manager import registry_for
from compquant.core.saving import write_text_atomic

LLM_COMPRESSOR_ONE_GPU_SECONDS = 745  # Llama-3-8B GPTQ, one GPU, as llm-compressor reports it (issue 14)


def random_llama(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """A `LlamaForCausalLM` of the requested shape with random weights, made on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=args.blocks, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seqlen, 8192), rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=getattr(torch, args.dtype)).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--solver", default="gptq")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run this on a machine with a GPU, or pass --device cpu with small shapes",
              file=sys.stderr)
        return 2
    model = random_llama(args, device)
    ids = torch.randint(args.vocab, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    config = compquant.QuantConfig(solver=args.solver, grid={"bits": 4, "group_size": 128}, device=str(device),
                                   calibration={"nsamples": args.samples, "seqlen": args.seqlen})
    solver_class = type(registry_for(None).get("solver", args.solver))
    if device.type == "cuda":
        torch.cuda.synchronize()
    with PhaseClocks(solver_class) as clocks, measure() as timing:
        report = compquant.quantize(model, config, calibration=ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
    phases = {name: seconds for name, seconds in clocks.phases(timing.seconds).items()
              if name not in ("reductions", "gathers", "idle")}  # one process: no collectives
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "settings": vars(args), "quantize_seconds": timing.seconds,
               "seconds_per_block": timing.seconds / args.blocks, "phases": phases,
               "peak_gpu_gib": None if timing.peak_cuda_bytes is None else timing.peak_cuda_bytes / 2**30,
               "peak_rss_gib": timing.peak_rss_bytes / 2**30, "layers": len(report.records),
               "llm_compressor_one_gpu_seconds": LLM_COMPRESSOR_ONE_GPU_SECONDS}
    print(f"{figures['device']}: {args.solver} W4 g128 on {args.blocks} blocks ({args.hidden}/{args.intermediate}), "
          f"{args.samples} x {args.seqlen} tokens: {timing.seconds:.1f} s ({figures['seconds_per_block']:.2f} s a block; "
          f"llm-compressor reports {LLM_COMPRESSOR_ONE_GPU_SECONDS} s for Llama-3-8B on one GPU)")
    print("  " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()))
    if figures["peak_gpu_gib"] is not None:
        print(f"  peak GPU memory {figures['peak_gpu_gib']:.1f} GiB")
    if args.out:
        write_text_atomic(args.out, json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
