"""Writing a quantized model: checked before any work starts, written to a temporary folder beside
the destination, and moved into place only when complete, so a failed run leaves nothing behind
and never touches the input model."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .config import QuantConfig
from .errors import OutputPathError
from .online import describe_input_ops
from .report import QuantReport

CONFIG_FILE = "compquant.json"
REPORT_FILE = "compquant_report.json"
ONLINE_OPS_FILE = "compquant_online_ops.json"


def check_output(output: str | Path, source: str | Path | None) -> Path:
    """Refuse an output that exists or overlaps the input model; return it resolved."""
    output = Path(output).expanduser().resolve()
    if source is not None and Path(source).exists():
        source = Path(source).resolve()
        source_dir = source if source.is_dir() else source.parent
        if output == source or output == source_dir or source_dir in output.parents or output in source.parents:
            raise OutputPathError(
                f"output {output} would overwrite or nest inside the input model {source}; choose a folder elsewhere"
            )
    if output.exists():
        raise OutputPathError(f"output {output} already exists; choose a new folder or remove it first")
    if not output.parent.exists():
        raise OutputPathError(f"the parent folder of the output, {output.parent}, does not exist; create it first")
    if not os.access(output.parent, os.W_OK):
        raise OutputPathError(f"the output's parent folder {output.parent} is not writable")
    return output


def save_quantized(
    model: Any,
    tokenizer: Any | None,
    output: str | Path,
    *,
    config: QuantConfig,
    report: QuantReport,
    source: str | Path | None = None,
) -> Path:
    """Save ``model`` (safetensors), its tokenizer, the resolved config, the per-layer report and the
    online input ops transforms attached (`compquant.load_model` re-attaches them; plain
    `transformers` loading does not know them)."""
    output = check_output(output, source)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(staging, safe_serialization=True)
        else:  # a timm model: config.json and model.safetensors that timm's local-dir: loader reads
            from timm.models import save_for_hf

            save_for_hf(model, staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / CONFIG_FILE).write_text(config.to_json())
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
        online = describe_input_ops(model)
        if online:
            (staging / ONLINE_OPS_FILE).write_text(json.dumps(online, indent=2))
        _fsync_tree(staging)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename: readers see the old
    file or the whole new one, never half of it."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
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
