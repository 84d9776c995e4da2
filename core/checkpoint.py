"""Resuming a killed run: the calibration loop's progress, block by block, in a folder.

After every block the folder receives the block's quantized parameters, its layer records and
reports, and the calibration stream entering the next block; a small progress file, written last
and atomically, names the number of finished blocks. A restarted run with the same model, data
and config reloads all of that and continues with the next block, so it ends with the same bits
as a run that was never interrupted. Anything written after the last progress file is ignored.

The folder is keyed by a fingerprint of the model's weights, the calibration data and the config;
a different fingerprint refuses to resume and says which of the three changed. Every block file,
stream file and progress file carries the fingerprint's digest too, and each is checked when it is
reloaded, so a block written by a run with another configuration can never be reloaded, even where
the folder's fingerprint file was written by the resuming run. (The output lock of
`compquant.core.lock` keeps two runs from sharing a folder in the first place.)
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from .errors import CompquantError
from .qlinear import QuantizedLinear
from .quantizer import Grid
from .report import BlockReport, LayerReport
from .files import save_safetensors
from .saving import replace_atomic, write_text_atomic

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
PROGRESS_FILE = "progress.json"


class ResumeMismatchError(CompquantError):
    """A checkpoint folder was made by a run with another model, data or config."""


def tensor_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of named tensors' names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_fingerprint(model: nn.Module, batches: Sequence[Tensor] | None, config: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model's weights before any transform, the
    calibration inputs, and the config (as a JSON mapping)."""
    return {
        "model": tensor_digest(model.state_dict().items()),
        "data": tensor_digest((str(i), batch) for i, batch in enumerate(batches or ())),
        "config": config,
    }


@dataclass
class Resumed:
    """What a checkpoint restores: how many blocks are done, and the streams entering the next."""

    blocks_done: int
    hidden: list[Tensor]
    fp_hidden: list[Tensor] | None
    learning: list[BlockReport] = field(default_factory=list)
    """The learner's reports of the finished blocks (none without a learner)."""


class BlockCheckpoint:
    """The progress of one run in ``folder``, created on first use; whoever saves the run's output
    removes the folder afterwards (the CLI does)."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any]) -> None:
        self.folder = Path(folder).expanduser()
        self.fingerprint = fingerprint
        self.digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------------------ reading
    def blocks_done(self) -> int:
        """Finished blocks recorded in the folder (0 when there is none); refuses a folder made
        by a different run."""
        stored = self.folder / FINGERPRINT_FILE
        if not stored.exists():
            return 0
        previous = json.loads(stored.read_text())
        changed = [part for part in ("model", "data") if previous.get(part) != self.fingerprint[part]]
        changed += [f"config.{key}" for key in _changed_keys(previous.get("config", {}), self.fingerprint["config"])]
        if changed:
            raise ResumeMismatchError(
                f"the checkpoint in {self.folder} was made by a run with a different {', '.join(changed)}; "
                "run again with the original settings to resume, or delete that folder to start over"
            )
        progress = self.folder / PROGRESS_FILE
        if not progress.exists():
            return 0
        recorded = json.loads(progress.read_text())
        self._check_digest(recorded.get("fingerprint"), progress)
        return recorded["blocks_done"]

    def restore(
        self, blocks: Sequence[nn.Module], prefix: str, grid: Grid
    ) -> tuple[Resumed, dict[str, QuantizedLinear], list[LayerReport]]:
        """Load every finished block's parameters into ``blocks`` and return the streams entering
        the next block with the finished layers' records and reports."""
        done = self.blocks_done()
        records: dict[str, QuantizedLinear] = {}
        reports: list[LayerReport] = []
        for index in range(done):
            tensors = self._load(self.folder / _block_file(index))
            state = {key.removeprefix("param."): value for key, value in tensors.items() if key.startswith("param.")}
            blocks[index].load_state_dict(state, strict=True)
            for item in json.loads((self.folder / _reports_file(index)).read_text()):
                report = LayerReport(**{**item, "shape": tuple(item["shape"])})
                reports.append(report)
                records[report.name] = QuantizedLinear.from_tensors(tensors, f"record.{report.name}", grid)
        resumed = Resumed(done, [], None)
        for index in range(done):
            learned = self.folder / _learning_file(index)
            if learned.exists():
                resumed.learning.append(BlockReport(**json.loads(learned.read_text())))
        if done:
            stream = self._load(self.folder / _stream_file(done))
            count = sum(key.startswith("hidden.") for key in stream)
            resumed.hidden = [stream[f"hidden.{i}"] for i in range(count)]
            if "fp.0" in stream:
                resumed.fp_hidden = [stream[f"fp.{i}"] for i in range(count)]
            log.info("resuming from %s: %d finished blocks of %s reloaded", self.folder, done, prefix)
        return resumed, records, reports

    def _load(self, path: Path) -> dict[str, Tensor]:
        """The tensors of one checkpoint file, refused unless this run's fingerprint wrote it."""
        with safe_open(path, framework="pt") as handle:
            self._check_digest((handle.metadata() or {}).get("fingerprint"), path)
        return load_file(path)

    def _check_digest(self, recorded: str | None, path: Path) -> None:
        if recorded != self.digest:
            raise ResumeMismatchError(
                f"{path} in the checkpoint was written by a run with a different model, data or config than this one "
                f"(the folder mixes the work of two runs); delete {self.folder} to start over"
            )

    def discard(self) -> None:
        """Remove the folder: its blocks cannot lead to a good result (the run failed on bad numbers)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------------------------ writing
    def _save(self, tensors: dict[str, Tensor], path: Path) -> None:
        replace_atomic(path, lambda temporary: save_safetensors(tensors, temporary, {"fingerprint": self.digest}))

    def save_block(
        self,
        index: int,
        block: nn.Module,
        records: dict[str, QuantizedLinear],
        reports: list[LayerReport],
        hidden: Sequence[Tensor] | None,
        fp_hidden: Sequence[Tensor] | None,
        learning: BlockReport | None = None,
    ) -> None:
        """Record block ``index`` as finished; ``hidden``/``fp_hidden`` enter block ``index + 1``;
        ``learning`` is the learner's report of the block."""
        if index == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.folder / FINGERPRINT_FILE, json.dumps(self.fingerprint, indent=2, sort_keys=True))
        tensors = {f"param.{key}": value.detach().cpu().contiguous() for key, value in block.state_dict().items()}
        for name, record in records.items():
            tensors.update(record.tensors(f"record.{name}"))
        self._save(tensors, self.folder / _block_file(index))
        write_text_atomic(self.folder / _reports_file(index), json.dumps([vars(report) for report in reports]))
        if learning is not None:
            write_text_atomic(self.folder / _learning_file(index), json.dumps(asdict(learning)))
        stream = {f"hidden.{i}": h.detach().cpu().contiguous() for i, h in enumerate(hidden or ())}
        stream.update({f"fp.{i}": h.detach().cpu().contiguous() for i, h in enumerate(fp_hidden or ())})
        self._save(stream, self.folder / _stream_file(index + 1))
        write_text_atomic(self.folder / PROGRESS_FILE, json.dumps({"blocks_done": index + 1, "fingerprint": self.digest}))
        (self.folder / _stream_file(index)).unlink(missing_ok=True)


def finished_blocks(folder: str | Path) -> int:
    """How many blocks the checkpoint in ``folder`` records as finished (0 without one), unchecked:
    for telling a stopped run what is kept."""
    try:
        return int(json.loads((Path(folder) / PROGRESS_FILE).read_text())["blocks_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes the checkpoint in ``folder`` already takes on disk (0 without one): space a resumed
    run does not need again."""
    folder = Path(folder)
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _block_file(index: int) -> str:
    return f"block_{index:05d}.safetensors"


def _reports_file(index: int) -> str:
    return f"block_{index:05d}.json"


def _learning_file(index: int) -> str:
    return f"block_{index:05d}.learning.json"


def _stream_file(index: int) -> str:
    return f"stream_into_{index:05d}.safetensors"
