"""What every peer tool's side of a side-by-side benchmark shares (`peer_llmcompressor.py`,
`peer_gptqmodel.py`, `peer_autoround.py`): the command line, the start (threads, the output that
must not exist, the calibration ids), the atomic save of the model and the result file. The
standard library and torch only: each peer imports it from its own environment."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

from process_memory import rss_mib  # bench/process_memory.py, beside this script


def peer_parser(doc: str, *, gptq: bool = True) -> argparse.ArgumentParser:
    """The options every peer takes: the same model folder, calibration ids and grid as compquant
    (and, for a GPTQ peer, ``--percdamp``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="full-precision model folder (save_pretrained)")
    parser.add_argument("--calibration", required=True, help="torch.save'd (nsamples, seqlen) int64 token ids")
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True)
    if gptq:
        parser.add_argument("--percdamp", type=float, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--output", required=True, help="folder for the quantized model (must not exist)")
    parser.add_argument("--result", required=True, help="JSON file for time, memory and versions")
    return parser


def start(args: argparse.Namespace) -> tuple[Path, object, float]:
    """Set the threads, refuse an existing output (exit 2), load the calibration ids: (output, the
    (nsamples, seqlen) ids, the perf_counter reading the timings start from)."""
    import sys
    import time

    import torch

    torch.set_num_threads(args.threads)
    output = Path(args.output)
    if output.exists():
        print(f"output {output} already exists; remove it or choose another", file=sys.stderr)
        raise SystemExit(2)
    started = time.perf_counter()
    return output, torch.load(args.calibration), started


def write_result(path: str, tool: str, versioned: tuple[str, ...], times: tuple[float, float, float],
                 rss_before_quantize: float, peak_after_quantize: float, threads: int, **extra: object) -> None:
    """The result file, written last: ``times`` are (started, loaded, quantized) perf_counter
    readings; the process's peak RSS with the save is read now."""
    import time

    started, loaded, quantized = times
    result = {
        "tool": tool,
        "quantize_seconds": quantized - loaded,
        "load_seconds": loaded - started,
        "process_seconds": time.perf_counter() - started,
        "peak_rss_mib": peak_after_quantize,
        "rss_before_quantize_mib": rss_before_quantize,
        "peak_rss_mib_with_save": rss_mib(),
        **extra,
        "versions": {"python": platform.python_version(), **{name: version(name) for name in versioned}},
        "threads": threads,
    }
    Path(path).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def save_atomically(output: Path, model: object, tokenizer: object, **save_options: object) -> None:
    """``save_pretrained`` of the model and tokenizer into a staging folder beside ``output``,
    renamed into place only when both are complete, so a killed peer leaves no half-written model."""
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        model.save_pretrained(staging, **save_options)
        tokenizer.save_pretrained(staging)
        os.chmod(staging, 0o755)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
