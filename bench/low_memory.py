"""Low-memory mode at Llama-2-7B's layer shapes: a synthetic Llama (hidden 4096, intermediate 11008,
32 heads, 4 layers, vocabulary 32000, random weights, float32 safetensors shards on disk) quantized
by GPTQ W4 g128 block by block, and, for contrast, with the whole model in memory. Each run is its
own process, which reports its own peak RSS (ru_maxrss).

    taskset -c 0,1 python bench/low_memory.py --threads 2 --work /tmp/compquant-7b-shapes
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
          "num_hidden_layers": 4, "vocab_size": 32000, "max_position_embeddings": 4096}

RUN = """
import sys, torch, compquant
from compquant.core.low_memory import quantize_low_memory
folder, output, mode, threads, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
config = compquant.QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 128}, calibration={"batch_size": 4})
calibration = torch.randint(0, 32000, (tokens // 512, 512), generator=torch.Generator().manual_seed(0))
if mode == "low-memory":
    skeleton = compquant.load_model(folder, low_memory=True)
    quantize_low_memory(skeleton.model, skeleton.weights, config, output, calibration=calibration, format="fake")
else:
    loaded = compquant.load_model(folder)
    report = compquant.quantize(loaded.model, config, calibration=calibration)
    compquant.save_quantized(loaded.model, None, output, config=config, report=report, format="fake")
import resource
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def make_model(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import compquant

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES), dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size="1GB")
    # a tokenizer makes it an ordinary model folder; calibration here is random token ids below 32000
    compquant.load_model("smollm2-135m").tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/compquant-7b-shapes"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens (windows of 512)")
    parser.add_argument("--modes", default="low-memory,in-memory")
    parser.add_argument("--out", type=Path, help="also write the table to this JSON file")
    args = parser.parse_args()
    folder = args.work / "model"
    if not folder.exists():
        make_model(folder)
    on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    block = 4 * 4096 * 4096 + 3 * 4096 * 11008
    rows = {"model_bytes": on_disk, "block_bytes": block * 4, "activation_bytes": args.tokens * 4096 * 4,
            "tokens": args.tokens, "threads": args.threads, "runs": {}}
    for mode in args.modes.split(","):
        output = args.work / f"out-{mode}"
        subprocess.run(["rm", "-rf", str(output)], check=True)
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", RUN, str(folder), str(output), mode, str(args.threads),
                              str(args.tokens)], check=True, stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        peak = int(run.stdout.split()[-1])  # the run's own ru_maxrss, printed last
        rows["runs"][mode] = {"seconds": seconds, "peak_rss_bytes": peak}
        print(f"{mode:>10}: {seconds:7.1f} s, peak RSS {peak / 2**30:.2f} GiB", flush=True)
    gib = 2**30
    print(f"model on disk {on_disk / gib:.2f} GiB (float32), one block {rows['block_bytes'] / gib:.2f} GiB, "
          f"calibration activations {rows['activation_bytes'] / gib:.2f} GiB per stream")
    if args.out:
        from compquant.core.saving import write_text_atomic

        write_text_atomic(args.out, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
