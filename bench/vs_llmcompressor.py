"""compquant's GPTQ beside llm-compressor's `GPTQModifier` on SmolLM2-135M: quantization wall time,
peak RSS and WikiText-2 perplexity, with the ratios compquant / llm-compressor.

Both tools start from one full-precision folder (the `smollm2-135m` preset saved once with
`save_pretrained`), see the same calibration token ids (WikiText-2 validation windows drawn once
here and saved as a tensor) and the same settings: asymmetric integer groups of 64 (a group size
that divides SmolLM2's 576), static act order, percdamp 0.01, lazy blocks of 128, batches of 8
windows. Each quantization runs in its own process, which reports its quantization wall time
(model load and save excluded) and its peak RSS (imports, model load and quantization included);
both saved models are then loaded here (llm-compressor's compressed-tensors folder decompressed to
dense weights) and scored by the same perplexity code.

By default llm-compressor calibrates all linears of a decoder layer in one pass over the unquantized
layer; compquant's default calibrates each group of linears on the outputs of the already quantized
ones (true-sequential), in one pass per block too. The default rows: ``compquant-blocks`` (compquant
with `calibration.sequential: blocks`, llm-compressor's loop) against ``llmcompressor``, like for
like; and ``compquant`` (the default loop) against the same ``llmcompressor`` row, for time only (the
loops differ, so their perplexities need not agree). `--tools` adds ``llmcompressor-ts``
(llm-compressor with a calibration subgraph per Linear, which makes it true-sequential), compared with
``compquant`` like for like; see `TOOLS` and `PAIRS`.

llm-compressor pins older torch and transformers than compquant uses, so its side runs in a virtual
environment of its own (`--peer-venv`, built on first use from the package registry: torch's CPU
wheel first, then llmcompressor), through `bench/peer_llmcompressor.py`. The project's environment
is untouched. Each finished row is written to the JSON output at once; a rerun skips finished rows.

    python bench/vs_llmcompressor.py --threads 2
    taskset -c 1 python bench/vs_llmcompressor.py --nsamples 4 --seqlen 64 --eval-limit 2 --bits 4 \\
        --threads 1 --out /tmp/vs_smoke.json     # a smoke run, a few minutes on one core
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from common import resumed_table  # bench/common.py, beside this script
from process_memory import rss_mib  # bench/process_memory.py, beside this script

import torch

REPO = Path(__file__).resolve().parents[1]
PEER_SCRIPT = Path(__file__).resolve().with_name("peer_llmcompressor.py")
# Each row's tool, and the extra arguments of llm-compressor's side. "llmcompressor" is its default
# pipeline: one calibration pass per decoder layer, so o_proj, gate/up and down_proj see the outputs
# of the layer's still unquantized linears. "llmcompressor-ts" ends a subgraph at every Linear, so
# each linear is calibrated on the outputs of the already quantized ones, as compquant does.
# "compquant-blocks" is compquant with `calibration.sequential: blocks`, the same loop as llm-compressor's
# default; "compquant" is compquant's default, true-sequential loop.
TOOLS: dict[str, list[str]] = {
    "compquant-blocks": ["--sequential", "blocks"],
    "llmcompressor": [],
    "compquant": ["--sequential", "groups"],
    "llmcompressor-ts": ["--sequential-targets", "Linear"],
}
OURS = ("compquant-blocks", "compquant")
# The ratio rows, (ours, peer, targets): time, peak RSS, perplexity (at most 0.8x, at most 1x, within 1 %
# for a like-for-like pair; None: not held to one). compquant's true-sequential loop must beat the time
# of llm-compressor's default one-pass-per-layer loop; its perplexity is another loop's.
PAIRS = (
    ("compquant-blocks", "llmcompressor", (0.8, 1.0, 0.01)),
    ("compquant", "llmcompressor", (1.0, None, None)),
    ("compquant", "llmcompressor-ts", (0.8, 1.0, 0.01)),
)
PEER_TORCH = "torch==2.13.0"
PEER_LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
# Options that change the numbers: a results file written with other values is refused.
NUMERIC = ("model", "nsamples", "seqlen", "group_size", "percdamp", "blocksize", "batch_size", "eval_limit",
           "eval_seqlen", "threads", "seed")


# ------------------------------------------------------------------ environments and versions
def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run ``command`` with its output appended to ``log``; on failure show the log's tail."""
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{' '.join(command[:3])} ... failed with exit code {done.returncode}; "
                           f"last lines of {log}:\n{tail}")


def peer_versions(python: Path) -> dict[str, str] | None:
    """Versions installed in the peer environment, or None when it is missing or incomplete."""
    if not python.is_file():
        return None
    probe = ("import json, platform, torch, importlib.metadata as m\n"
             "def v(n):\n"
             "    try:\n        return m.version(n)\n"
             "    except m.PackageNotFoundError:\n        return None\n"
             "print(json.dumps({'python': platform.python_version(), 'torch_cuda': torch.version.cuda, "
             "**{n: v(n) for n in ('torch', 'transformers', 'llmcompressor', 'compressed-tensors')}}))")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else None


def wanted(found: dict[str, str] | None) -> bool:
    return (found is not None and (found["torch"] or "").split("+")[0] == PEER_TORCH.split("==")[1]
            and found["llmcompressor"] == PEER_LLMCOMPRESSOR.split("==")[1])


def ensure_peer_venv(venv: Path, log: Path) -> tuple[dict[str, str], float | None]:
    """The peer environment's versions, building it first if it is missing or incomplete; the
    second value is the build time in seconds (None when an existing environment was reused)."""
    python = venv / "bin" / "python"
    found = peer_versions(python)
    if wanted(found):
        return found, None
    print(f"building llm-compressor's environment in {venv} (log: {log})", flush=True)
    started = time.perf_counter()
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not python.is_file():
        run_logged([sys.executable, "-m", "venv", str(venv)], log)
    # torch first, so llmcompressor's `torch<=2.14.0` is already satisfied and pip never resolves a
    # torch of its own. Only a CPU build is accepted (on Linux the registry's default is the multi-GiB
    # CUDA one); pip takes the CPU wheel from its find-links when it lies on the disk.
    report = venv / "torch-resolution.json"
    run_logged([str(python), "-m", "pip", "install", "--dry-run", "--report", str(report), PEER_TORCH], log)
    chosen = [item["metadata"]["version"] for item in json.loads(report.read_text())["install"]
              if item["metadata"]["name"] == "torch"]
    if chosen and "+cpu" not in chosen[0]:
        raise RuntimeError(f"pip would install torch {chosen[0]}, not a CPU build; put the CPU wheel "
                           f"torch-2.13.0+cpu on a pip find-links folder (pip config: find-links) and rerun")
    run_logged([str(python), "-m", "pip", "install", PEER_TORCH], log)
    run_logged([str(python), "-m", "pip", "install", PEER_LLMCOMPRESSOR], log)
    found = peer_versions(python)
    if not wanted(found):
        raise RuntimeError(f"{venv} holds {found} after the install, not {PEER_TORCH} and {PEER_LLMCOMPRESSOR}; see {log}")
    return found, time.perf_counter() - started


def our_versions() -> dict[str, str]:
    """Versions on compquant's side (which also loads and scores both saved models)."""
    def git(*args: str) -> str:
        # GIT_OPTIONAL_LOCKS=0: `git status` must not refresh the index of a tree others work in
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
            "compressed-tensors": version("compressed-tensors"), "compquant": version("compquant"),
            "compquant_git": git("rev-parse", "--short=12", "HEAD") + (" (modified)" if dirty else "")}


# ------------------------------------------------------------------ shared inputs
def prepare_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The full-precision folder both tools start from and the calibration tokens both see."""
    import compquant
    from compquant.core.saving import write_text_atomic
    from compquant.evaluation.datasets import calibration_windows

    fp = work / f"fp-{Path(args.model).name}"
    tokens = work / f"calibration-{Path(args.model).name}-wikitext2-n{args.nsamples}-l{args.seqlen}-s{args.seed}.pt"
    if fp.is_dir() and tokens.is_file():
        return fp, tokens
    loaded = compquant.load_model(args.model)
    if not fp.is_dir():
        staging = work / f".{fp.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        loaded.model.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
        write_text_atomic(staging / "source.txt", f"{loaded.source}\n")
        staging.rename(fp)
    if not tokens.is_file():
        windows = calibration_windows(loaded.tokenizer, "wikitext2", nsamples=args.nsamples, seqlen=args.seqlen,
                                      seed=args.seed, data_dir=args.data_dir)
        partial = tokens.with_name(f".{tokens.name}.partial")
        torch.save(windows.contiguous(), partial)
        partial.rename(tokens)
    return fp, tokens


# ------------------------------------------------------------------ one quantization, one process
def quantize_command(tool: str, args: argparse.Namespace, python: Path, fp: Path, tokens: Path, bits: int,
                     output: Path, result: Path) -> list[str]:
    common = ["--model-dir", str(fp), "--calibration", str(tokens), "--bits", str(bits),
              "--group-size", str(args.group_size), "--percdamp", str(args.percdamp), "--blocksize", str(args.blocksize),
              "--batch-size", str(args.batch_size), "--threads", str(args.threads),
              "--output", str(output), "--result", str(result)]
    if tool in OURS:
        return [sys.executable, str(Path(__file__).resolve()), "_quantize-compquant", *common, *TOOLS[tool]]
    return [str(python), str(PEER_SCRIPT), *common, *TOOLS[tool]]


def compquant_side(argv: list[str]) -> int:
    """compquant's counterpart of `peer_llmcompressor.py`, run in a process of its own."""
    parser = argparse.ArgumentParser(prog="vs_llmcompressor.py _quantize-compquant")
    for name in ("--model-dir", "--calibration", "--output", "--result", "--sequential"):
        parser.add_argument(name, required=True)
    for name, kind in (("--bits", int), ("--group-size", int), ("--percdamp", float), ("--blocksize", int),
                       ("--batch-size", int), ("--threads", int)):
        parser.add_argument(name, type=kind, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import compquant
    from compquant.core.saving import write_text_atomic

    started = time.perf_counter()
    tokens = torch.load(args.calibration)
    loaded = compquant.load_model(args.model_dir)
    config = compquant.QuantConfig(
        solver="gptq",
        solver_options={"act_order": True, "static_groups": True, "percdamp": args.percdamp, "blocksize": args.blocksize},
        grid={"bits": args.bits, "group_size": args.group_size, "sym": False},
        calibration={"nsamples": tokens.shape[0], "seqlen": tokens.shape[1], "batch_size": args.batch_size,
                     "sequential": args.sequential},
    )
    ready = time.perf_counter()
    rss_loaded = rss_mib("VmRSS")
    report = compquant.quantize(loaded.model, config, calibration=tokens)
    quantized = time.perf_counter()
    peak = rss_mib()
    compquant.save_quantized(loaded.model, loaded.tokenizer, args.output, config=config, report=report)
    result = {"tool": "compquant", "quantize_seconds": quantized - ready, "load_seconds": ready - started,
              "process_seconds": time.perf_counter() - started, "peak_rss_mib": peak,
              "rss_before_quantize_mib": rss_loaded,
              "peak_rss_mib_with_save": rss_mib(),
              "quantized_layers": len(report.layers), "mean_relative_error": report.mean_relative_error,
              "threads": torch.get_num_threads()}
    write_text_atomic(args.result, json.dumps(result, indent=2))
    return 0


def quantize(tool: str, args: argparse.Namespace, python: Path, fp: Path, tokens: Path, bits: int, work: Path) -> dict:
    """Run one tool at one bit width in a fresh process; its result, with where the model went."""
    # the settings' digest in the name: a model quantized with other settings is never taken for this one
    digest = hashlib.sha1(json.dumps({key: getattr(args, key) for key in NUMERIC}, sort_keys=True).encode()).hexdigest()
    name = f"{tool}-w{bits}-g{args.group_size}-n{args.nsamples}-l{args.seqlen}-{digest[:8]}"
    output, result, log = work / name, work / f"{name}.json", work / f"{name}.log"
    if result.is_file() and output.is_dir():
        return {**json.loads(result.read_text()), "output": str(output)}
    shutil.rmtree(output, ignore_errors=True)  # left by a run killed before it wrote its result
    log.unlink(missing_ok=True)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if tool not in OURS:
        env.pop("PYTHONPATH", None)  # nothing of this environment may leak into the peer's
    print(f"quantizing with {tool} at W{bits} (log: {log})", flush=True)
    run_logged(quantize_command(tool, args, python, fp, tokens, bits, output, result), log, env)
    return {**json.loads(result.read_text()), "output": str(output)}


# ------------------------------------------------------------------ scoring
def load_saved(folder: Path):
    """A saved model as dense float32 weights. llm-compressor's compressed-tensors folders are
    decompressed on load, so both are scored by the same dense forward."""
    import inspect

    from transformers import AutoModelForCausalLM

    extra = {}
    config = json.loads((folder / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
        from transformers.utils.quantization_config import CompressedTensorsConfig

        newer = "dequantize" in inspect.signature(CompressedTensorsConfig).parameters  # run_compressed is deprecated
        extra["quantization_config"] = CompressedTensorsConfig(**({"dequantize": True} if newer else {"run_compressed": False}))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def perplexity_of(folder: Path, args: argparse.Namespace, test_ids: torch.Tensor) -> tuple[float, float]:
    from compquant.evaluation.perplexity import perplexity_of_tokens

    model = load_saved(folder)
    started = time.perf_counter()
    result = perplexity_of_tokens(model, test_ids, dataset="wikitext2", seqlen=args.eval_seqlen, limit=args.eval_limit)
    return result.perplexity, time.perf_counter() - started


# ------------------------------------------------------------------ the run
def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="compquant model spec saved once as the fp folder")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    parser.add_argument("--eval-limit", type=int, default=64, help="WikiText-2 test windows scored")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--tools", default="compquant-blocks,llmcompressor,compquant",
                        help=f"rows per bit width, from {list(TOOLS)}; llmcompressor-ts is llm-compressor made "
                             "true-sequential, compquant-blocks is compquant with llm-compressor's per-layer loop")
    parser.add_argument("--group-size", type=int, default=64, help="llm-compressor needs a divisor of 576 here")
    parser.add_argument("--percdamp", type=float, default=0.01, help="dampening_frac on llm-compressor's side")
    parser.add_argument("--blocksize", type=int, default=128, help="block_size on llm-compressor's side")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward, both sides")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "compquant-bench" / "vs_llmcompressor"),
                        help="fp folder, calibration tokens, saved models and logs (several GiB at W4+W3)")
    parser.add_argument("--peer-venv", default=str(Path.home() / ".cache" / "compquant-bench" / "llmcompressor-venv"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "vs_llmcompressor.json"))
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_quantize-compquant"]:
        return compquant_side(argv[1:])
    args = parse(argv)
    torch.set_num_threads(args.threads)
    from compquant.core.saving import write_text_atomic
    from compquant.evaluation.datasets import evaluation_tokens

    tools = [tool for tool in args.tools.split(",") if tool]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        print(f"unknown --tools {sorted(unknown)}; choose from {list(TOOLS)}", file=sys.stderr)
        return 2
    settings = {key: getattr(args, key) for key in NUMERIC}
    out = Path(args.out)
    done = resumed_table(out, settings)
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    venv = Path(args.peer_venv).expanduser()
    peer, built = ensure_peer_venv(venv, work / "peer-venv-build.log")
    done["versions"] = {"compquant_side": our_versions(), "llmcompressor_side": peer}
    done.setdefault("peer_venv", {"path": str(venv), "build_seconds": None})
    if built is not None:
        done["peer_venv"] = {"path": str(venv), "build_seconds": built}
    write_text_atomic(out, json.dumps(done, indent=2))

    fp, tokens = prepare_inputs(args, work)
    from transformers import AutoTokenizer

    test_ids = evaluation_tokens(AutoTokenizer.from_pretrained(fp), "wikitext2", data_dir=args.data_dir)
    if "fp" not in done:
        ppl, seconds = perplexity_of(fp, args, test_ids)
        done["fp"] = {"perplexity": ppl, "eval_seconds": seconds}
        write_text_atomic(out, json.dumps(done, indent=2))
    for bits in [int(b) for b in args.bits.split(",") if b]:
        for tool in tools:
            if any(run["tool"] == tool and run["bits"] == bits for run in done["runs"]):
                continue
            run = quantize(tool, args, venv / "bin" / "python", fp, tokens, bits, work)
            run["perplexity"], run["eval_seconds"] = perplexity_of(Path(run["output"]), args, test_ids)
            if tool in OURS:
                run["versions"] = our_versions()  # the tree as it was when this row was made
            done["runs"].append({**run, "bits": bits, "tool": tool})
            write_text_atomic(out, json.dumps(done, indent=2))
            print(f"W{bits} {tool:<14} ppl {run['perplexity']:9.3f}  quantize {run['quantize_seconds']:7.1f} s  "
                  f"peak {run['peak_rss_mib']:6.0f} MiB", flush=True)
    print(table(done))
    return 0


def table(done: dict) -> str:
    """One markdown table, a ratio row per bit width, then the versions on both sides."""
    s = done["settings"]
    lines = [f"SmolLM2-135M, GPTQ W(bits) g{s['group_size']} asymmetric, static act order, percdamp {s['percdamp']}, "
             f"blocks of {s['blocksize']}; calibration {s['nsamples']} x {s['seqlen']} tokens of WikiText-2 validation "
             f"(seed {s['seed']}, the same token ids on both sides, batches of {s['batch_size']}); evaluation "
             f"{s['eval_limit']} x {s['eval_seqlen']} tokens of WikiText-2 test; {s['threads']} thread(s).",
             "quantize s: the quantization call alone (model load and save excluded); peak RSS: the quantizing "
             "process (imports, model load, quantization); at start: its RSS after imports and model load.", ""]
    if "fp" in done:
        lines.append(f"fp (float32) perplexity: {done['fp']['perplexity']:.3f}")
        lines.append("")
    lines += ["| bits | tool | quantize s | peak RSS MiB (at start) | WikiText-2 ppl |", "|---|---|---|---|---|"]
    for bits in sorted({run["bits"] for run in done["runs"]}, reverse=True):
        rows = {run["tool"]: run for run in done["runs"] if run["bits"] == bits}
        for tool in TOOLS:
            if tool in rows:
                r = rows[tool]
                lines.append(f"| W{bits} | {tool} | {r['quantize_seconds']:.1f} | {r['peak_rss_mib']:.0f} "
                             f"({r['rss_before_quantize_mib']:.0f}) | {r['perplexity']:.3f} |")
        for ours, peer, (time_bar, rss_bar, ppl_bar) in PAIRS:
            if ours not in rows or peer not in rows:
                continue
            ratio = [rows[ours][key] / rows[peer][key] for key in ("quantize_seconds", "peak_rss_mib", "perplexity")]
            lines.append(f"| W{bits} | {ours} / {peer} | {ratio[0]:.2f}x | {ratio[1]:.2f}x | {ratio[2]:.4f}x |")
            checks = [(f"<= {time_bar}x", ratio[0] <= time_bar if time_bar else None),
                      (f"<= {rss_bar}x", ratio[1] <= rss_bar if rss_bar else None),
                      (f"within {ppl_bar:.0%}" if ppl_bar else "", abs(ratio[2] - 1) <= ppl_bar if ppl_bar else None)]
            met = ["-" if ok is None else "met" if ok else "MISSED" for _, ok in checks]
            bars = ", ".join(bar for bar, ok in checks if ok is not None)
            lines.append(f"| W{bits} | targets ({bars}) | {met[0]} | {met[1]} | {met[2]} |")
    lines.append("")
    for side, found in done.get("versions", {}).items():
        lines.append(f"{side}: " + ", ".join(f"{name} {value}" for name, value in found.items() if name != "torch_cuda"))
    build = done.get("peer_venv", {}).get("build_seconds")
    if build is not None:
        lines.append(f"llm-compressor environment built in {build:.0f} s at {done['peer_venv']['path']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
