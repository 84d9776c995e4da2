"""Writing a quantized model: checked before any work starts (overlap with the input, an existing
folder, permissions, free space), written to a temporary folder beside the destination and moved
into place only when complete, so a failed run leaves nothing behind and never touches the input
model. Every file write is atomic (temporary file, fsync, rename)."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pluggy
import torch

from .config import QuantConfig
from .errors import OutputPathError
from .exporters import ExportJob, choose_exporter, write_export
from .finite import check_before_writing
from .lock import exclusive
from .online import describe_online_ops
from .plugin_manager import registry_for
from .report import QuantReport

CONFIG_FILE = "compquant.json"
REPORT_FILE = "compquant_report.json"
ONLINE_OPS_FILE = "compquant_online_ops.json"
STAGING_SUFFIX = ".partial"

log = logging.getLogger(__name__)


def check_output(
    output: str | Path, source: str | Path | None, *, overwrite: bool = False, needed_bytes: int = 0
) -> Path:
    """Refuse an output that overlaps the input model, exists (unless ``overwrite`` and it is an
    earlier compquant output), cannot be written, or lies on a disk with less than ``needed_bytes``
    free; return it resolved."""
    output = Path(output).expanduser().resolve()
    if source is not None and Path(source).exists():
        source = Path(source).resolve()
        source_dir = source if source.is_dir() else source.parent
        if output == source or output == source_dir or source_dir in output.parents or output in source.parents:
            raise OutputPathError(
                f"output {output} would overwrite or nest inside the input model {source}; choose a folder elsewhere"
            )
    if output.exists():
        if not overwrite:
            raise OutputPathError(f"output {output} already exists; choose a new folder, or pass --overwrite to replace it")
        if not output.is_dir() or (any(output.iterdir()) and not (output / CONFIG_FILE).is_file()):
            raise OutputPathError(
                f"output {output} exists and is not a compquant output (no {CONFIG_FILE}); --overwrite only replaces "
                "earlier compquant outputs, so remove it yourself if it should go"
            )
    if not output.parent.exists():
        raise OutputPathError(f"the parent folder of the output, {output.parent}, does not exist; create it first")
    if not os.access(output.parent, os.W_OK):
        raise OutputPathError(f"the output's parent folder {output.parent} is not writable; choose another place")
    free = shutil.disk_usage(output.parent).free
    if free < needed_bytes:
        raise OutputPathError(
            f"{output.parent} has {free / 2**20:.0f} MiB free but this run needs about {needed_bytes / 2**20:.0f} MiB "
            "(the model and its resume checkpoint); free space or choose an output on another disk"
        )
    return output


def check_writable_file(path: str | Path, option: str) -> Path:
    """Refuse, before the work, a result file that cannot be written: a folder, or a place whose
    nearest existing folder is not writable (the folders between are created on writing)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; name a file to write the result to, e.g. {path / 'result.json'}")
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OutputPathError(f"{option} {path} cannot be written: {existing} is not a writable folder; choose another place")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {path} exists and is not writable; choose another file")
    return path


def needed_bytes(model: Any, dtype: torch.dtype | None = None, *, resume: bool = False) -> int:
    """A generous estimate of the disk space a run writes: the model de-quantized in ``dtype``
    (the largest export), and as much again for the resume checkpoint, plus 10%."""
    size = sum(p.numel() * (dtype or p.dtype).itemsize for p in model.parameters())
    return int(size * (2 if resume else 1) * 1.1)


def save_quantized(
    model: Any,
    tokenizer: Any | None,
    output: str | Path,
    *,
    config: QuantConfig,
    report: QuantReport,
    source: str | Path | None = None,
    format: str = "auto",
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    plugin_manager: pluggy.PluginManager | None = None,
) -> Path:
    """Export ``model`` in ``format`` (a registered exporter, see docs/formats.md; ``auto`` picks the
    first of compressed-tensors, GPTQ and fake-quantized that can express the run), with its tokenizer, the
    resolved config, the per-layer report and any online input ops (`compquant.load_model`
    re-attaches them; plain `transformers` does not know them). The folder appears complete or not
    at all; with ``overwrite`` an earlier compquant output there is replaced only once the new one
    is complete."""
    output = check_output(output, source, overwrite=overwrite)
    check_before_writing(model.state_dict().items(), "the quantized model")
    registry = registry_for(plugin_manager)
    online = describe_online_ops(model, registry)
    job = ExportJob(model, report.records, online, dtype, max_shard_size)
    exporter = choose_exporter(format, job, registry)
    with staged_output(output, overwrite=overwrite) as staging:
        export = write_export(exporter, job, staging)
        write_metadata(staging, tokenizer, config, report, export, online)
    log.info("saved the %s export to %s", export["format"], output)
    return output


@contextmanager
def staged_output(output: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``output`` to write into; fsynced and renamed to ``output`` when
    the block completes, removed if it fails (a full disk becomes an `OutputPathError`). The
    output's lock is held throughout, so staging folders of the same output left by a killed run
    are stale, and are removed first."""
    with exclusive(output):
        remove_stale_staging(output)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=STAGING_SUFFIX, dir=output.parent))
        try:
            yield staging
            _fsync_tree(staging)
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
            _move_into_place(staging, output, overwrite=overwrite)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                raise OutputPathError(
                    f"the disk of {output.parent} filled up while the model was written; nothing was left behind. "
                    "Free space and save again"
                ) from error
            raise


def remove_stale_staging(output: Path) -> None:
    """Remove the staging folders of ``output`` that a killed run left (call with its lock held:
    no live run is then writing one)."""
    # mkdtemp's names: the prefix, eight characters of its alphabet, the suffix (so the staging folders
    # of an output named "out.v2" never match those of "out")
    pattern = re.compile(rf"\.{re.escape(output.name)}\.[a-z0-9_]{{8}}{re.escape(STAGING_SUFFIX)}")
    for stale in output.parent.iterdir():
        if pattern.fullmatch(stale.name) and stale.is_dir():
            log.warning("removing %s, left by a run that was killed while saving %s", stale, output)
            shutil.rmtree(stale, ignore_errors=True)


def write_metadata(
    folder: Path, tokenizer: Any | None, config: QuantConfig, report: QuantReport, export: dict[str, str],
    online: dict[str, Any],
) -> None:
    """The tokenizer, the resolved config, the report with the export's format, and the online ops."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / CONFIG_FILE).write_text(config.to_json())
    (folder / REPORT_FILE).write_text(json.dumps({**report.to_dict(), "export": export}, indent=2))
    if online:
        (folder / ONLINE_OPS_FILE).write_text(json.dumps(online, indent=2))


def _move_into_place(staging: Path, output: Path, *, overwrite: bool) -> None:
    """Rename ``staging`` to ``output``; an existing ``output`` (allowed only with ``overwrite``)
    is moved aside first and deleted only after the rename succeeded."""
    if not output.exists() or not overwrite:
        os.rename(staging, output)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".replaced", dir=output.parent))
    os.rename(output, aside / output.name)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(aside / output.name, output)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """fsync every file (each made an ordinary file readable as the umask allows: some writers,
    safetensors among them, create private files) and the folder itself."""
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~_umask())
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see `replace_atomic`)."""
    return replace_atomic(path, lambda temporary: temporary.write_text(text))


def replace_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Have ``write`` fill a temporary file beside ``path``, fsync it and rename it over ``path``:
    readers see the old file or the whole new one, never half of it, and a failed write leaves
    nothing behind."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change global state briefly)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
