"""The ``compquant`` command line: quantize, eval, compare, plugins."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .core.config import QuantConfig, read_config_file
from .core.errors import CompquantError

log = logging.getLogger("compquant")

DEFAULT_MODEL = "smollm2-135m"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except ValidationError as error:
        print(f"error: invalid configuration:\n{error}", file=sys.stderr)
    except (CompquantError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise
        print(f"error: {error.strerror} while writing {error.filename or 'a file'}; free space or fix the "
              "permissions, then run the same command again (finished blocks are kept and resumed)", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------- parser
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compquant", description="Weight-only post-training quantization.")
    commands = parser.add_subparsers(dest="command", required=True)

    quantize = commands.add_parser("quantize", help="quantize a model and save it")
    quantize.add_argument("model", nargs="?", help=f"local folder, .gguf file, hub name or preset ({DEFAULT_MODEL})")
    _quant_options(quantize)
    quantize.add_argument("--output", "-o", help="folder to create for the quantized model (must not exist)")
    quantize.add_argument("--checkpoint", help="local weights (safetensors or .pth) for a timm:NAME model")
    quantize.add_argument("--format", default="auto",
                          help="export format: auto (default: compressed-tensors where it can express the run, "
                               "else gptq, else fake) or any registered exporter (`compquant plugins` lists them)")
    quantize.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                          help="dtype of the written scales and unquantized weights (default: the model's)")
    quantize.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing compquant output folder")
    quantize.add_argument("--no-resume", action="store_true",
                          help="keep no per-block checkpoint (by default a killed run resumes when run again)")
    quantize.add_argument("--low-memory", action="store_true",
                          help="read, quantize and write one block at a time (a local safetensors folder; no "
                               "transforms, no resume)")
    quantize.set_defaults(run=_run_quantize)

    evaluate = commands.add_parser("eval", help="evaluate an original or saved model")
    evaluate.add_argument("model", help="local folder, .gguf file, hub name, preset, or a compquant output folder")
    evaluate.add_argument("--ppl", help="perplexity dataset (default wikitext2 unless --tasks is given; language models)")
    evaluate.add_argument("--tasks", help="zero-shot lm-eval tasks, comma-separated, e.g. "
                          "piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai (language models)")
    evaluate.add_argument("--imagefolder", help="top-1 accuracy on this image folder, one sub-folder per class (vision models)")
    evaluate.add_argument("--checkpoint", help="local weights (safetensors or .pth) for a timm:NAME model")
    evaluate.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    evaluate.add_argument("--limit", type=int, help="evaluate at most this many windows, images, or documents per task")
    evaluate.add_argument("--batch-size", type=int,
                          help="windows (default 1), images (default 256) or task requests (default 8) per forward pass")
    evaluate.add_argument("--transform", action="append", default=[], help="apply a transform first (repeatable)")
    evaluate.add_argument("--transform-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                          help="a transform option, e.g. quarot.r3=true")
    _transform_check_options(evaluate)
    evaluate.add_argument("--data-dir", help="local data folder (else $COMPQUANT_DATA_DIR, else the hub)")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when present)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of any random transform")
    evaluate.add_argument("--json", help="also write the result to this JSON file")
    evaluate.set_defaults(run=_run_eval)

    compare = commands.add_parser("compare", help="fp vs solvers: perplexity, wall time, peak memory in one table")
    compare.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model to compare on (default {DEFAULT_MODEL})")
    _quant_options(compare)
    compare.add_argument("--solvers", default="rtn,gptq", help="comma-separated solvers (default rtn,gptq)")
    compare.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length (default 512)")
    compare.add_argument("--eval-limit", type=int, default=64, help="evaluation windows (default 64; 0 for all)")
    compare.add_argument("--json", help="also write the table to this JSON file")
    compare.set_defaults(run=_run_compare)

    plugins = commands.add_parser("plugins", help="list registered solvers, transforms and adapters")
    plugins.set_defaults(run=_run_plugins)

    for command in (quantize, evaluate, compare, plugins):
        command.add_argument("--quiet", "-q", action="store_true", help="only warnings and results")
        command.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


# Sized so that `compquant compare` on SmolLM2-135M takes about ten minutes on a 2-core CPU.
COMPARE_DEFAULTS: dict[str, dict[str, Any]] = {
    "grid": {"bits": 3, "group_size": 128},
    "calibration": {"nsamples": 128, "seqlen": 512},
}


def _quant_options(parser: argparse.ArgumentParser) -> None:
    """Options that override the config file; unset ones leave it alone."""
    add = parser.add_argument
    add("--config", help="YAML or JSON config file; the options below override it")
    add("--solver", help="solver name (`compquant plugins` lists them)")
    add("--option", action="append", default=[], metavar="KEY=VALUE", help="a solver option, e.g. percdamp=0.1")
    add("--bits", type=int, help="weight bits, 2-8")
    add("--group-size", type=int, help="columns per grid, or -1 for per-row")
    add("--sym", action="store_true", default=None, help="symmetric grid")
    add("--clip", action="store_true", default=None, help="MSE clipping search")
    add("--act-order", action="store_true", default=None, help="quantize columns by decreasing Hessian diagonal")
    add("--transform", action="append", help="transform applied before calibration (repeatable)")
    add("--transform-option", action="append", default=[], metavar="NAME.KEY=VALUE",
        help="a transform option, e.g. quarot.r3=true")
    _transform_check_options(parser)
    add("--adapter", help="architecture adapter (default: detected)")
    add("--calib", help="calibration dataset (default wikitext2)")
    add("--nsamples", type=int, help="calibration windows")
    add("--seqlen", type=int, help="tokens per calibration window")
    add("--batch-size", type=int, help="calibration windows per forward pass")
    add("--sequential", choices=["groups", "blocks"],
        help="statistics per group after the earlier groups are quantized (groups, default) or of all groups "
             "from one pass of the unquantized block (blocks: llm-compressor's loop, for like-for-like comparisons)")
    add("--data-dir", help="local data folder (else $COMPQUANT_DATA_DIR, else the hub)")
    add("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when present)")
    add("--seed", type=int, help="calibration sampling seed")
    add("--stats-dtype", choices=["float32", "float64"], help="dtype of statistics and solves")


def _transform_check_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transform-tolerance", type=float,
                        help="largest relative logits change a transform may cause (default by dtype: 1e-3 for float32)")
    parser.add_argument("--no-transform-check", dest="transform_check", action="store_false", default=None,
                        help="do not compare the logits before and after the transforms")


def build_config(args: argparse.Namespace, defaults: dict[str, dict[str, Any]] | None = None) -> QuantConfig:
    """``defaults``, then the config file (if any), then every option given on the command line."""
    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    for section, values in (defaults or {}).items():
        data[section] = {**values, **data.get(section, {})}
    grid = data.setdefault("grid", {})
    calibration = data.setdefault("calibration", {})
    solver_options = data.setdefault("solver_options", {})
    overrides = [
        (data, "model", getattr(args, "model", None)),
        (data, "solver", args.solver),
        (data, "adapter", args.adapter),
        (data, "transforms", args.transform),
        (data, "device", args.device),
        (data, "seed", args.seed),
        (data, "data_dir", args.data_dir),
        (data, "stats_dtype", args.stats_dtype),
        (data, "transform_check", args.transform_check),
        (data, "transform_tolerance", args.transform_tolerance),
        (data, "output", getattr(args, "output", None)),
        (grid, "bits", args.bits),
        (grid, "group_size", args.group_size),
        (grid, "sym", args.sym),
        (grid, "clip", args.clip),
        (calibration, "dataset", args.calib),
        (calibration, "nsamples", args.nsamples),
        (calibration, "seqlen", args.seqlen),
        (calibration, "batch_size", args.batch_size),
        (calibration, "sequential", args.sequential),
        (solver_options, "act_order", args.act_order),
    ]
    for target, key, value in overrides:
        if value is not None:
            target[key] = value
    for item in args.option:
        key, value = _key_value("--option", "KEY=VALUE", item)
        solver_options[key] = value
    for name, options in transform_options(args.transform_option).items():
        data.setdefault("transform_options", {}).setdefault(name, {}).update(options)
    return QuantConfig.model_validate(data)


def _key_value(flag: str, form: str, item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{flag} takes {form}, got {item!r}")
    return key.replace("-", "_"), yaml.safe_load(value)


def transform_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["quarot.r3=true", ...]`` as ``{"quarot": {"r3": True}, ...}``."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, value = _key_value("--transform-option", "NAME.KEY=VALUE", item)
        name, dot, option = key.partition(".")
        if not dot or not option:
            raise ValueError(f"--transform-option takes NAME.KEY=VALUE (e.g. quarot.r3=true), got {item!r}")
        options.setdefault(name, {})[option] = value
    return options


# -------------------------------------------------------------------------------------- commands
def _run_quantize(args: argparse.Namespace) -> int:
    import torch

    from .api import quantize, quantize_low_memory
    from .core.exporters import check_format
    from .core.pipeline import check_plugins, needs_calibration
    from .core.plugin_manager import registry_for
    from .core.saving import check_output, needed_bytes, save_quantized
    from .evaluation.datasets import check_dataset
    from .models.loading import load_model, resolve_model_path

    config = build_config(args)
    if config.model is None:
        raise ValueError(f"name a model to quantize (a folder, .gguf file, hub name or the preset {DEFAULT_MODEL})")
    if config.output is None:
        raise ValueError("name the output folder with --output DIR (it must not exist yet)")
    registry = registry_for(None)
    check_plugins(config, registry)
    check_format(args.format, registry)
    if needs_calibration(config, registry):
        check_dataset(config.calibration.dataset, "calibration", config.data_dir)
    source = resolve_model_path(config.model)
    output = check_output(config.output, source, overwrite=args.overwrite)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.low_memory:
        loaded = load_model(config.model, low_memory=True)
        report = quantize_low_memory(loaded.model, loaded.weights, config, output, tokenizer=loaded.tokenizer,
                                     format=args.format, dtype=dtype, max_shard_size=args.max_shard_size,
                                     overwrite=args.overwrite)
        print(f"saved {config.solver} W{config.grid.bits} model to {output} block by block "
              f"({len(report.layers)} linears, {report.seconds:.1f} s)")
        return 0
    loaded = load_model(config.model, checkpoint=args.checkpoint)
    check_output(output, source, overwrite=args.overwrite,
                 needed_bytes=needed_bytes(loaded.model, dtype, resume=not args.no_resume))
    resume_dir = None if args.no_resume else output.parent / f".{output.name}.compquant-resume"
    report = quantize(loaded.model, config, tokenizer=loaded.tokenizer, resume_dir=resume_dir)
    saved = save_quantized(loaded.model, loaded.tokenizer, output, config=config, report=report, source=source,
                           format=args.format, overwrite=args.overwrite, dtype=dtype, max_shard_size=args.max_shard_size)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)
    error = report.mean_relative_error
    print(f"saved {config.solver} W{config.grid.bits} model to {saved} "
          f"({len(report.layers)} linears, mean relative error {'n/a' if error is None else f'{error:.4f}'}, "
          f"{report.seconds:.1f} s)")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from .core.dataset import resolve_data_dir
    from .core.pipeline import apply_transforms, check_transforms, resolve_device
    from .core.plugin_manager import registry_for
    from .core.saving import write_text_atomic
    from .core.transform import TransformContext
    from .evaluation.datasets import check_dataset
    from .evaluation.task_configs import check_tasks
    from .evaluation.zeroshot import parse_tasks
    from .models.loading import load_model

    registry = registry_for(None)
    options = transform_options(args.transform_option)
    check_transforms(args.transform, options, registry)  # fail on a bad name or option before loading the model
    tasks = parse_tasks(args.tasks) if args.tasks is not None else []
    if tasks:  # likewise on a task without a local copy, a missing data file, or no lm-eval
        check_tasks(tasks, resolve_data_dir(args.data_dir))
    if args.ppl:
        check_dataset(args.ppl, "evaluation", args.data_dir)
    device = resolve_device(args.device)
    loaded = load_model(args.model, checkpoint=args.checkpoint)
    model = loaded.model.to(device).eval()
    if args.transform:
        apply_transforms(model, args.transform, registry, registry.adapter_for(model), TransformContext(seed=args.seed),
                         options, check=args.transform_check is not False, tolerance=args.transform_tolerance)
    record: dict[str, Any] = {"model": loaded.source, "transforms": args.transform, "transform_options": options}
    if loaded.is_vision:
        from .evaluation.images import top1_accuracy

        if tasks:
            raise ValueError(f"{args.model} is a vision model: --tasks needs a language model")
        if not args.imagefolder:
            raise ValueError(f"{args.model} is a vision model: give --imagefolder DIR (one sub-folder per class)")
        result = top1_accuracy(model, args.imagefolder, batch_size=args.batch_size or 256, limit=args.limit)
        print(f"{loaded.source}: top-1 {100 * result.top1:.2f}% on {result.images} images of {result.folder}")
        record.update(result.to_dict())
    else:
        record.update(_evaluate_language_model(args, model, loaded, tasks))
    if args.json:
        write_text_atomic(args.json, json.dumps(record, indent=2))
    return 0


def _evaluate_language_model(args: argparse.Namespace, model: Any, loaded: Any, tasks: list[str]) -> dict[str, Any]:
    """Perplexity on ``--ppl`` (wikitext2 when neither it nor ``--tasks`` is given) and zero-shot
    ``tasks``; a compquant output folder also gets the zero-shot result beside its model."""
    from .core.saving import CONFIG_FILE, write_text_atomic
    from .evaluation.perplexity import perplexity
    from .evaluation.zeroshot import ZEROSHOT_FILE, zero_shot

    record: dict[str, Any] = {}
    dataset = args.ppl or (None if tasks else "wikitext2")
    if dataset:
        result = perplexity(model, loaded.tokenizer, dataset, seqlen=args.seqlen, limit=args.limit,
                            batch_size=args.batch_size or 1, data_dir=args.data_dir)
        print(f"{loaded.source}: {result.dataset} perplexity {result.perplexity:.4f} "
              f"({result.windows} windows x {result.seqlen} tokens)")
        record.update(result.to_dict())
    if tasks:
        scores = zero_shot(model, loaded.tokenizer, tasks, data_dir=args.data_dir, limit=args.limit,
                           batch_size=args.batch_size or 8)
        print(f"{loaded.source}: zero-shot\n{scores.table()}")
        record["zeroshot"] = scores.to_dict()
        folder = Path(loaded.source)
        if folder.is_dir() and (folder / CONFIG_FILE).is_file():
            beside = {"model": loaded.source, "transforms": args.transform, **scores.to_dict()}
            write_text_atomic(folder / ZEROSHOT_FILE, json.dumps(beside, indent=2))
    return record


def _run_compare(args: argparse.Namespace) -> int:
    from .core.pipeline import check_plugins
    from .core.plugin_manager import registry_for
    from .core.saving import write_text_atomic
    from .evaluation.compare import EVALUATION_DATASET, compare
    from .evaluation.datasets import check_dataset

    config = build_config(args, COMPARE_DEFAULTS)
    solvers = tuple(name.strip() for name in args.solvers.split(",") if name.strip())
    for solver in solvers:  # every name and dataset checked before the model loads
        check_plugins(config.model_copy(update={"solver": solver, "solver_options": {}}), registry_for(None))
    check_dataset(config.calibration.dataset, "calibration", config.data_dir)
    check_dataset(EVALUATION_DATASET, "evaluation", config.data_dir)
    result = compare(
        config.model or DEFAULT_MODEL,
        config,
        solvers=solvers,
        eval_seqlen=args.eval_seqlen,
        eval_limit=args.eval_limit or None,
        data_dir=config.data_dir,
    )
    print(result.table())
    if args.json:
        write_text_atomic(args.json, json.dumps(result.to_dict(), indent=2))
    return 0


def _run_plugins(args: argparse.Namespace) -> int:
    from .core.plugin_manager import registry_for

    registry = registry_for(None)
    rows = [(entry.kind, entry.name, entry.plugin, entry.distribution) for entry in registry.entries()]
    widths = [max(len(str(row[i])) for row in rows + [("kind", "name", "plugin", "distribution")]) for i in range(4)]
    for row in [("kind", "name", "plugin", "distribution"), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
