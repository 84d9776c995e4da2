"""GPTQModel's side of the side-by-side benchmark: GPTQModel quantizing on the CPU, GPTQ or its
GPTAQ mode (``--gptaq``), from the same full-precision folder and the same calibration token ids
as the other tools' sides (the interface of `peer_llmcompressor.py`, so that `vs_llmcompressor.py`'s
driver can run it the same way).

GPTQModel is not a compquant dependency: this runs in GPTQModel's environment (docs/results.md says
how it is built) and imports only gptqmodel, torch, transformers, the standard library and
`process_memory.py` beside it, never compquant.

    <venv>/bin/python bench/peer_gptqmodel.py --model-dir FP --calibration TOKENS.pt --bits 4 \\
        --group-size 64 --percdamp 0.01 --batch-size 8 --threads 2 [--gptaq] --output OUT --result OUT.json

Writes the quantized model to ``--output`` (GPTQModel's GPTQ format, which `compquant.load_model`
reads) and, last, ``--result``: quantization wall time, peak RSS and versions. GPTQModel also writes
a ``logs/`` folder into the working directory: run it from a scratch folder. Measured on a 2-layer
tiny Llama (hidden 128, 8 x 64 tokens, 2 threads): it runs; its first quantization in a fresh
environment took 223 s, mostly compiling its CPU extensions, a GPTAQ run after it 10 s.
"""
from __future__ import annotations

import os
import sys
import time

from peer_common import peer_parser, start, write_result  # bench/peer_common.py, beside this script
from process_memory import rss_mib

VERSIONED = ("torch", "transformers", "gptqmodel", "accelerate")


def main() -> int:
    parser = peer_parser(__doc__)
    parser.add_argument("--gptaq", action="store_true", help="GPTQModel's GPTAQ mode (alpha 0.25) instead of GPTQ")
    args = parser.parse_args()

    output, tokens, started = start(args)
    # GPTQModel sizes its CPU worker pool at half the cores and its loader asks for two workers, so on
    # a 2-core machine it refuses to start ("requests 2 workers but parent 'cpu' only has 1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, args.threads)))
    import torch

    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import GPTAQConfig

    # the windows are complete sequences of equal length: every token attended, no padding
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in tokens]
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=False, desc_act=True,
                            damp_percent=args.percdamp, gptaq=GPTAQConfig(alpha=0.25, device="cpu") if args.gptaq else None)
    model = GPTQModel.load(args.model_dir, config, device="cpu", dtype=torch.float32)
    loaded = time.perf_counter()
    rss_loaded = rss_mib("VmRSS")
    model.quantize(calibration, batch_size=args.batch_size, calibration_sort=None)
    quantized = time.perf_counter()
    peak_after_quantize = rss_mib()
    model.save(str(output))
    write_result(args.result, "gptqmodel-gptaq" if args.gptaq else "gptqmodel", VERSIONED, (started, loaded, quantized),
                 rss_loaded, peak_after_quantize, torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
