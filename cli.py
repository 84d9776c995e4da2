"""The ``compquant`` command line: quantize, eval, compare, plugins.

Every mistake in the input ends the same way: exit status 2 and one ``error:`` line that names the
problem and the fix (and the file, where a file is the problem), with nothing written. Ctrl-C and
SIGTERM end with one line saying what was kept and the command that resumes.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml
from pydantic import ValidationError

from .core.config import QuantConfig, read_config_file
from .core.errors import CompquantError

if TYPE_CHECKING:
    from .core.distributed import Ranks

log = logging.getLogger("compquant")

DEFAULT_MODEL = "smollm2-135m"
#: errno values that mean the disk or its permissions, not the input, stopped a write.
DISK_ERRORS = (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EFBIG)


class Stopped(BaseException):
    """SIGTERM, raised where the process is so that every clean-up (staging folder, lock) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed as one line
        return int(done.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    args.argv = argv
    where = _rank_prefix()
    if where and os.environ.get("RANK") != "0":  # one rank reports progress and results; the others their errors
        log.setLevel(logging.WARNING)
        os.environ["COMPQUANT_NO_PROGRESS"] = "1"
    with _signals_raise(), _foreign_progress_bars_off_a_terminal():
        try:
            return args.run(args)
        except (KeyboardInterrupt, Stopped) as stop:
            signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
            print(_stopped_message(args, argv, signal.Signals(signum).name), file=sys.stderr)
            return 128 + signum
        except ValidationError as error:
            from .core.options import describe_validation_error

            _error(where + describe_validation_error(error, "invalid configuration", QuantConfig))
        except (CompquantError, ValueError, FileNotFoundError, ArithmeticError) as error:
            _error(where + str(error))
        except RuntimeError as error:
            if not where or not _lost_a_rank(error):
                raise
            _error(f"{where}lost contact with another rank, which stopped (its error is above): {error}")
        except OSError as error:
            if error.errno not in DISK_ERRORS:
                raise
            again = ("run the same command again (finished blocks are kept and resumed)"
                     if getattr(args, "resume_dir", None) else "run the same command again")
            _error(f"{where}{error.strerror} while writing {error.filename or 'a file'}; free space or fix the "
                   f"permissions, then {again}")
    return 2


def _error(message: str) -> None:
    """One ``error:`` line, however many lines the message had."""
    print("error: " + "; ".join(line.strip() for line in str(message).splitlines() if line.strip()), file=sys.stderr)


def _rank_prefix() -> str:
    """``rank 1 of 2: `` in a rank of a run on several (started by torchrun or --nproc), else nothing."""
    from .core.distributed import launched

    if not launched() or os.environ["WORLD_SIZE"] == "1":
        return ""
    return f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: "


def _lost_a_rank(error: RuntimeError) -> bool:
    """Whether ``error`` is torch.distributed's: a collective whose other ranks are gone."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError)


def _stopped_message(args: argparse.Namespace, argv: list[str], name: str) -> str:
    """What a stopped run kept, and the command that continues it."""
    from .core.checkpoint import finished_blocks

    command = shlex.join(["compquant", *argv])
    resume_dir = getattr(args, "resume_dir", None)
    if args.command != "quantize":
        return f"stopped by {name}; nothing was written. Run it again with: {command}"
    if resume_dir is None:
        why = "--low-memory does not resume" if args.low_memory else "--no-resume"
        return f"stopped by {name}; no blocks are kept ({why}), nothing was written. Start over with: {command}"
    done = finished_blocks(resume_dir)
    if not done:
        return f"stopped by {name} before the first block was finished; nothing was written. Start again with: {command}"
    return (f"stopped by {name}; the {done} finished blocks are kept in {resume_dir}. Resume with the same command: "
            f"{command}")


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM raises `Stopped` for the duration (as Ctrl-C raises KeyboardInterrupt), so that a run
    ended by a scheduler cleans up and says so; the previous handler comes back afterwards."""
    def stop(signum: int, frame: Any) -> NoReturn:
        raise Stopped(signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _foreign_progress_bars_off_a_terminal() -> Iterator[None]:
    """Off a terminal, the libraries' own progress bars (transformers' "Loading weights", the hub's
    downloads) would write carriage-return bars into a log; compquant logs progress lines instead."""
    if sys.stderr.isatty():
        yield
        return
    from unittest import mock

    loaded = "transformers" in sys.modules  # else the variable reaches it when it is imported
    if loaded:
        from transformers.utils import logging as transformers_logging

        enabled = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
    try:
        with mock.patch.dict(os.environ, {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}):
            yield
    finally:
        if loaded and enabled:
            transformers_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one ``error:`` line that points at the help."""

    def error(self, message: str) -> NoReturn:
        _error(f"{message} (see `{self.prog} --help`)")
        sys.exit(2)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (0 and negatives are refused, not taken as a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compquant", description="Weight-only post-training quantization.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    quantize = commands.add_parser("quantize", help="quantize a model and save it")
    quantize.add_argument("model", nargs="?", help=f"local folder, .gguf file, hub name or preset ({DEFAULT_MODEL})")
    _quant_options(quantize)
    quantize.add_argument("--output", "-o", help="folder to create for the quantized model (must not exist)")
    quantize.add_argument("--checkpoint", help="local weights (safetensors or .pth) for a timm:NAME model")
    quantize.add_argument("--format", default="auto",
                          help="export format: auto (default: the first of compressed-tensors, gptq, gptq-v2 and fake "
                               "that can express the run) or any registered exporter (`compquant plugins` lists them)")
    quantize.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                          help="dtype of the written scales and unquantized weights (default: the source checkpoint's)")
    quantize.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing compquant output folder")
    quantize.add_argument("--no-resume", action="store_true",
                          help="keep no per-block checkpoint (by default a killed run resumes when run again)")
    quantize.add_argument("--nproc", type=positive_int,
                          help="run on N ranks on this machine, launched with torch.distributed.run (the same as "
                               "`torchrun --nproc-per-node N -m compquant quantize ...`)")
    quantize.add_argument("--low-memory", action="store_true",
                          help="read, quantize and write one block at a time (a local safetensors folder; no "
                               "transforms, no resume)")
    quantize.add_argument("--learner",
                          help="train each block by a learner before the solver quantizes it: lwc, lsi, sde or any "
                               "registered one (`compquant plugins` lists them; docs/learners.md)")
    quantize.add_argument("--learner-option", action="append", default=[], metavar="KEY=VALUE",
                          help="a learner option, e.g. epochs=10 or lookahead=1")
    quantize.set_defaults(run=_run_quantize)

    evaluate = commands.add_parser("eval", help="evaluate an original or saved model")
    evaluate.add_argument("model", help="local folder, .gguf file, hub name, preset, or a compquant output folder")
    evaluate.add_argument("--ppl", help="perplexity dataset (default wikitext2 unless --tasks is given; language models)")
    evaluate.add_argument("--tasks", help="zero-shot lm-eval tasks, comma-separated, e.g. "
                          "piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai (language models)")
    evaluate.add_argument("--imagefolder", help="top-1 accuracy on this image folder, one sub-folder per class (vision models)")
    evaluate.add_argument("--checkpoint", help="local weights (safetensors or .pth) for a timm:NAME model")
    evaluate.add_argument("--seqlen", type=positive_int, default=2048, help="tokens per window (default 2048)")
    evaluate.add_argument("--limit", type=positive_int,
                          help="evaluate at most this many windows, images, or documents per task")
    evaluate.add_argument("--batch-size", type=positive_int,
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

    compare = commands.add_parser("compare", help="fp vs solvers: perplexity, wall time, peak memory in one table",
                                  description="Defaults: W3 in groups of 128, 128 x 512 calibration tokens, and "
                                              "act-order for --solver (gptq) only; every option below overrides them.")
    compare.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model to compare on (default {DEFAULT_MODEL})")
    _quant_options(compare)
    compare.add_argument("--solvers", default="rtn,gptq", help="comma-separated solvers (default rtn,gptq)")
    compare.add_argument("--eval-seqlen", type=positive_int, default=512, help="evaluation window length (default 512)")
    compare.add_argument("--eval-limit", type=int, default=64, help="evaluation windows (default 64; 0 for all)")
    compare.add_argument("--json", help="also write the table to this JSON file")
    compare.set_defaults(run=_run_compare)

    plugins = commands.add_parser("plugins", help="list registered solvers, transforms and adapters")
    plugins.set_defaults(run=_run_plugins)

    for command in (quantize, evaluate, compare, plugins):
        command.add_argument("--quiet", "-q", action="store_true", help="only warnings and results")
        command.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    return parser


# Sized so that `compquant compare` on SmolLM2-135M takes about ten minutes on a 2-core CPU.
COMPARE_DEFAULTS: dict[str, dict[str, Any]] = {
    "grid": {"bits": 3, "group_size": 128},
    "calibration": {"nsamples": 128, "seqlen": 512},
    "solver_options": {"act_order": True},  # for the config's solver (gptq) only
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
    add("--act-order", action=argparse.BooleanOptionalAction, default=None,
        help="quantize columns by decreasing Hessian diagonal (--no-act-order: in their order)")
    add("--transform", action="append", help="transform applied before calibration (repeatable)")
    add("--transform-option", action="append", default=[], metavar="NAME.KEY=VALUE",
        help="a transform option, e.g. quarot.r3=true")
    _transform_check_options(parser)
    add("--adapter", help="architecture adapter (default: detected)")
    add("--calib", help="calibration dataset (default wikitext2)")
    add("--nsamples", type=positive_int, help="calibration windows")
    add("--seqlen", type=positive_int, help="tokens per calibration window")
    add("--batch-size", type=positive_int, help="calibration windows per forward pass")
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
        (data, "learner", getattr(args, "learner", None)),
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
    for item in getattr(args, "learner_option", []):
        key, value = _key_value("--learner-option", "KEY=VALUE", item)
        data.setdefault("learner_options", {})[key] = value
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
    from .core.distributed import launch, ranks_from_environment
    from .core.exporters import check_format, shard_size_bytes
    from .core.lock import exclusive
    from .core.pipeline import check_plugins, needs_calibration, resolve_device
    from .core.plugin_manager import registry_for
    from .core.saving import check_output
    from .evaluation.datasets import check_dataset
    from .models.loading import resolve_model_path

    config = build_config(args)
    if config.model is None:
        raise ValueError(f"name a model to quantize (a folder, .gguf file, hub name or the preset {DEFAULT_MODEL})")
    if config.output is None:
        raise ValueError("name the output folder with --output DIR (it must not exist yet)")
    # everything the config and the command line tell is checked before the model loads
    registry = registry_for(None)
    check_plugins(config, registry)
    check_format(args.format, registry)
    shard_size_bytes(args.max_shard_size)
    resolve_device(config.device)
    if needs_calibration(config, registry):
        check_dataset(config.calibration.dataset, "calibration", config.data_dir)
    _check_ranks(args, config, needs_calibration(config, registry))
    source = resolve_model_path(config.model)
    output = check_output(config.output, source, overwrite=args.overwrite)
    args.resume_dir = None if args.no_resume or args.low_memory else output.parent / f".{output.name}.compquant-resume"
    if args.nproc is not None and args.nproc > 1:  # the ranks run this command without --nproc; rank 0 keeps resume_dir
        launch(args.nproc, ["-m", "compquant", *_without_nproc(args.argv)])
        return 0
    with ranks_from_environment(resolve_device(config.device)) as ranks:
        # one run per output (and its resume folder), for the whole run; rank 0 writes for all
        with exclusive(output) if ranks.main else nullcontext():
            return _quantize_locked(args, config, source, output, registry, ranks)


def _check_ranks(args: argparse.Namespace, config: QuantConfig, calibrated: bool) -> None:
    """Refuse a run on several ranks that cannot work, before the model loads."""
    from .core.distributed import Ranks, launched
    from .core.pipeline import check_single_process_learner

    if args.nproc is not None and launched():
        raise ValueError("--nproc launches the ranks itself; under torchrun leave it out")
    world = args.nproc or (int(os.environ["WORLD_SIZE"]) if launched() else 1)
    if world > 1 and config.learner is not None:
        check_single_process_learner(config.learner, world)
    if world > 1 and calibrated:  # every rank needs a batch of its own
        Ranks(0, world).share(range(-(-config.calibration.nsamples // config.calibration.batch_size)))


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line without its ``--nproc N`` (what each launched rank runs)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            kept.append(item)
    return kept


def _quantize_locked(args: argparse.Namespace, config: QuantConfig, source: Path | None, output: Path,
                     registry: Any, ranks: Ranks) -> int:
    import torch

    from .api import quantize, quantize_low_memory
    from .core.checkpoint import checkpoint_bytes
    from .core.exporters import check_planned_export
    from .core.pipeline import planned_export
    from .core.saving import check_output, needed_bytes, save_quantized
    from .models.loading import load_model

    loaded = load_model(config.model, checkpoint=args.checkpoint, low_memory=args.low_memory)
    dtype = _export_dtype(args, loaded)
    check_planned_export(args.format, planned_export(loaded.model, config, registry, dtype, args.max_shard_size), registry)
    if args.low_memory:
        report = quantize_low_memory(loaded.model, loaded.weights, config, output, tokenizer=loaded.tokenizer,
                                     format=args.format, dtype=dtype, max_shard_size=args.max_shard_size,
                                     overwrite=args.overwrite)
        if ranks.main:
            _print_saved(config, output, report, "block by block")
        return 0
    needed = needed_bytes(loaded.model, dtype, resume=args.resume_dir is not None)
    check_output(output, source, overwrite=args.overwrite,
                 needed_bytes=needed - (checkpoint_bytes(args.resume_dir) if args.resume_dir else 0))
    report = quantize(loaded.model, config, tokenizer=loaded.tokenizer, resume_dir=args.resume_dir)
    if not ranks.main:
        return 0
    save_quantized(loaded.model, loaded.tokenizer, output, config=config, report=report, source=source,
                   format=args.format, overwrite=args.overwrite, dtype=dtype, max_shard_size=args.max_shard_size)
    if args.resume_dir is not None:
        shutil.rmtree(args.resume_dir, ignore_errors=True)
    _print_saved(config, output, report, f"{report.seconds:.1f} s")
    return 0


def _export_dtype(args: argparse.Namespace, loaded: Any) -> Any:
    """``--dtype``, else the dtype the source checkpoint stores (a float16 model stays float16 on
    disk, though it is quantized in float32)."""
    import torch

    if args.dtype:
        return getattr(torch, args.dtype)
    if loaded.source_dtype is not None:
        log.info("writing %s tensors, the source checkpoint's dtype (--dtype to choose another)",
                 str(loaded.source_dtype).removeprefix("torch."))
    return loaded.source_dtype


def _print_saved(config: QuantConfig, output: Path, report: Any, how: str) -> None:
    """The final line: what was saved where, in which format, and its size on disk."""
    from .core.saving import REPORT_FILE

    export = json.loads((output / REPORT_FILE).read_text()).get("export", {})
    size = sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
    error = report.mean_relative_error
    method = config.solver if config.learner is None else f"{config.learner}+{config.solver}"
    print(f"saved {method} W{config.grid.bits} model to {output} as {export.get('format')} "
          f"({_size(size)} on disk, {export.get('dtype')} tensors; {len(report.layers)} linears, mean relative error "
          f"{'n/a' if error is None else f'{error:.4f}'}; {how})")


def _size(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _run_eval(args: argparse.Namespace) -> int:
    from .core.dataset import resolve_data_dir
    from .core.pipeline import apply_transforms, check_transforms, resolve_device
    from .core.plugin_manager import registry_for
    from .core.saving import check_writable_file, write_text_atomic
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
    if args.ppl or not (tasks or args.imagefolder):
        check_dataset(args.ppl or "wikitext2", "evaluation", args.data_dir)
    if args.json:
        check_writable_file(args.json, "--json")
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
    from .core.pipeline import check_plugins, resolve_device
    from .core.plugin_manager import registry_for
    from .core.saving import check_writable_file, write_text_atomic
    from .evaluation.compare import EVALUATION_DATASET, compare, solver_run_config
    from .evaluation.datasets import check_dataset

    config = build_config(args, COMPARE_DEFAULTS)
    solvers = tuple(name.strip() for name in args.solvers.split(",") if name.strip())
    for solver in solvers:  # every name and dataset checked before the model loads
        check_plugins(solver_run_config(config, solver), registry_for(None))
    check_dataset(config.calibration.dataset, "calibration", config.data_dir)
    check_dataset(EVALUATION_DATASET, "evaluation", config.data_dir)
    resolve_device(config.device)
    if args.json:
        check_writable_file(args.json, "--json")
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
