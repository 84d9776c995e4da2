"""Top-1 on the MNIST test set of the small DeiT trained by examples/mnist_deit.py: full precision,
then RTN, GPTQ, GPTAQ, ResComp(GPTQ) and ResComp(GPTAQ) at W4/W3/W2, per-channel and g64 (asymmetric),
calibrated on 128 training images, with the wall time of each quantization.

    python examples/mnist_deit.py --out runs/mnist
    python bench/deit_mnist.py --run-dir runs/mnist --out bench/results/deit_mnist.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import compquant
from common import SOLVERS  # bench/common.py, beside this script
from compquant.core.measure import measure
from compquant.core.saving import write_text_atomic
from compquant.evaluation.images import calibration_images, top1_accuracy



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/mnist"))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/deit_mnist.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = compquant.load_model(str(args.run_dir / "deit"))
    model, test = loaded.model, args.run_dir / "test"
    calibration = calibration_images(model, args.run_dir / "train", nsamples=args.nsamples, seed=args.seed)
    with measure() as timing:
        fp = top1_accuracy(model, test)
    rows = [{"method": "fp", "bits": None, "group_size": None, "top1": fp.top1, "quantize_seconds": 0.0, "eval_seconds": timing.seconds}]
    print(f"fp: top-1 {100 * fp.top1:.2f}% on {fp.images} images", flush=True)
    for bits in (4, 3, 2):
        for group_size in (-1, 64):
            for label, (solver, options) in SOLVERS.items():
                config = compquant.QuantConfig(solver=solver, solver_options=options, seed=args.seed,
                                               grid={"bits": bits, "group_size": group_size},
                                               calibration={"nsamples": args.nsamples, "batch_size": 32})
                quantized = copy.deepcopy(model)
                with measure() as timing:
                    compquant.quantize(quantized, config, calibration=calibration)
                top1 = top1_accuracy(quantized, test).top1
                rows.append({"method": label, "bits": bits, "group_size": group_size, "top1": top1,
                             "quantize_seconds": timing.seconds})
                grid = "per-channel" if group_size == -1 else f"g{group_size}"
                print(f"W{bits} {grid:<11} {label:<15} top-1 {100 * top1:6.2f}%  {timing.seconds:6.2f} s", flush=True)
    write_text_atomic(args.out, json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
