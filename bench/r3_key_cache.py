"""What R3 is for: WikiText-2 perplexity of SmolLM2-135M whose KV cache keys are fake-quantized
(asymmetric, one grid per token and head, as QuaRot quantizes the cache), without and with QuaRot's
online R3 Hadamard on queries and keys. Weights stay full precision, so the difference is R3's alone
(QuaRot's R1, R2 and R4 leave the post-RoPE keys as they were).

compquant quantizes weights only; the key quantizer here is a benchmark op attached after R3 at the
same site, so the cache stores rotated, quantized keys, as a KV-cache quantizer would.

    python bench/r3_key_cache.py --data-dir ../shared/data --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import Tensor

import compquant
from compquant.core.online import OnlineOp, attach_attention_op
from compquant.core.pipeline import apply_transforms
from compquant.core.plugin_manager import registry_for
from compquant.core.quantizer import Grid
from compquant.core.saving import write_text_atomic
from compquant.core.transform import TransformContext
from compquant.evaluation.datasets import evaluation_tokens
from compquant.evaluation.perplexity import perplexity_of_tokens


class FakeQuantizeKeys(OnlineOp):
    """Round each key vector (one token, one head) to an asymmetric ``bits``-bit min-max grid."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.grid = Grid(bits=bits, group_size=-1)

    def forward(self, keys: Tensor) -> Tensor:
        rows = keys.reshape(-1, keys.shape[-1])
        return self.grid.fake_quantize(rows, self.grid.find_params(rows)).reshape(keys.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--bits", default="4,3,2", help="key bits, comma-separated")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--limit", type=int, default=16, help="evaluation windows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/r3_key_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = compquant.load_model(args.model)
    tokens = evaluation_tokens(loaded.tokenizer, "wikitext2", data_dir=args.data_dir)
    registry = registry_for(None)
    plain = loaded.model.eval()
    rotated = copy.deepcopy(plain)
    apply_transforms(rotated, ["quarot"], registry, registry.adapter_for(rotated), TransformContext(),
                     {"quarot": {"r3": True}})

    def perplexity(model, bits: int | None) -> float:
        if bits is not None:  # a copy with quantized keys; the model itself stays as it is
            model = copy.deepcopy(model)
            for layer in model.model.layers:
                attach_attention_op(model, layer.self_attn, FakeQuantizeKeys(bits), "key")
        return perplexity_of_tokens(model, tokens, dataset="wikitext2", seqlen=args.seqlen, limit=args.limit).perplexity

    print(f"{'keys':>15}  {'without R3':>10} {'with R3':>10}")
    rows = []
    for bits in [None, *(int(b) for b in args.bits.split(","))]:
        rows.append({"keys": "full precision" if bits is None else f"{bits}-bit",
                     "without R3": perplexity(plain, bits), "with R3": perplexity(rotated, bits)})
        print(f"{rows[-1]['keys']:>15}: {rows[-1]['without R3']:10.3f} {rows[-1]['with R3']:10.3f}", flush=True)
    result = {"model": loaded.source, "evaluation": f"{args.limit} windows x {args.seqlen} tokens of WikiText-2 test",
              "key grid": "asymmetric min-max, one per token and head", "rows": rows}
    write_text_atomic(Path(args.out), json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
