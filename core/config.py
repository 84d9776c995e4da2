"""The configuration of a whole run, as one pydantic model: loadable from YAML/JSON, overridable
from the CLI, saved beside every output, and strict about unknown keys."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import FileFormatError
from .files import read_json, read_text
from .quantizer import Grid

CONFIG_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GridConfig(_Strict):
    """The integer grid of the weights (see `compquant.core.quantizer`)."""

    bits: int = Field(4, ge=2, le=8, description="weight bits")
    group_size: int = Field(128, description="columns per grid; -1 for one grid per row")
    sym: bool = Field(False, description="symmetric grid")
    clip: bool = Field(False, description="MSE clipping search for each grid")
    convention: Literal["quarot", "ist"] = Field("quarot", description="grid convention (docs/methods.md §0)")

    @field_validator("group_size")
    @classmethod
    def _positive_or_per_row(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"group_size must be a positive number of columns or -1 (one grid per row), got {value}")
        return value

    def grid(self) -> Grid:
        return Grid(bits=self.bits, sym=self.sym, group_size=self.group_size, clip=self.clip, convention=self.convention)


class CalibrationConfig(_Strict):
    """Which calibration data, and how much of it."""

    dataset: str = Field("wikitext2", description="dataset name (never its test split)")
    nsamples: int = Field(128, ge=1, description="number of random windows")
    seqlen: int = Field(2048, ge=1, description="tokens per window")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")
    fp_inputs: Literal["auto", "stream", "cache"] = Field(
        "auto",
        description="full-precision inputs for GPTAQ/ResComp: an unquantized copy of each block run beside the "
        "quantized one (stream), each group's inputs kept from one pass of the unquantized block (cache), or cache "
        "when it fits fp_cache_mib (auto)",
    )
    fp_cache_mib: int = Field(2048, ge=0, description="memory allowed for cached full-precision inputs of one block")
    sequential: Literal["groups", "blocks"] = Field(
        "groups",
        description="statistics of each group after the groups before it in its block are quantized (groups: "
        "true-sequential, as the GPTQ/GPTAQ/ResComp papers), or of every group from one pass of the unquantized "
        "block (blocks: as llm-compressor and AutoGPTQ without true-sequential); groups runs each block once per batch "
        "and stream, blocks twice for the quantized stream",
    )
    expert_min_tokens: int | None = Field(
        None, ge=1, description="a mixture-of-experts expert whose router sent it fewer calibration tokens than this "
        "falls back to expert_fallback; default: its input width (below it the Hessian is singular)",
    )
    expert_fallback: str = Field(
        "all-tokens", description="what an expert with too few routed tokens is quantized from: the statistics of "
        "every token of its block as if routed to it (all-tokens), or a solver that needs no statistics (rtn); "
        "logged with the count and recorded as the layer's fallback in the report",
    )


class QuantConfig(_Strict):
    """Everything that determines a quantization run."""

    version: Literal[1] = CONFIG_VERSION
    model: str | None = Field(None, description="local folder, GGUF file, hub name or preset")
    adapter: str | None = Field(None, description="architecture adapter; detected from the model when unset")
    solver: str = Field("gptq", description="registered solver name")
    solver_options: dict[str, Any] = Field(default_factory=dict, description="the solver's own options")
    learner: str | None = Field(None, description="registered learner trained on each block before the solver quantizes "
                                "it (docs/learners.md); none by default")
    learner_options: dict[str, Any] = Field(default_factory=dict, description="the learner's own options")
    transforms: list[str] = Field(default_factory=list, description="transforms applied in order before calibration")
    transform_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="options per transform name")
    transform_check: bool = Field(
        True, description="after each transform, compare the logits of one calibration window with those before the "
        "transforms and stop when they moved more than transform_tolerance",
    )
    transform_tolerance: float | None = Field(
        None, gt=0, description="largest relative logits change a transform may cause; default by the model's dtype "
        "(1e-3 for float32/float64, 5e-2 for 16-bit)",
    )
    grid: GridConfig = Field(default_factory=GridConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    seed: int = Field(0, description="seed of the calibration sampling and of any random transform")
    device: str | None = Field(None, description="compute device; CUDA when present, else CPU")
    stats_dtype: Literal["float32", "float64"] = Field("float32", description="dtype of statistics and solves")
    data_dir: Path | None = Field(None, description="local data folder (else $COMPQUANT_DATA_DIR, else the hub)")
    output: Path | None = Field(None, description="output folder for the quantized model")

    @field_validator("device")
    @classmethod
    def _a_torch_device(cls, value: str | None) -> str | None:
        if value is not None:
            check_device_name(value)
        return value

    @classmethod
    def load(cls, path: str | Path) -> QuantConfig:
        """Read a config from a .json, .yaml or .yml file."""
        return cls.model_validate(read_config_file(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def check_device_name(name: str) -> None:
    """Refuse a device string torch does not parse (``tpu``), naming the ones compquant runs on."""
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a JSON or YAML config file; a missing, binary or malformed file is a
    `FileFormatError` (or ``FileNotFoundError``) that names it and the place of the mistake."""
    path = Path(path)
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise FileFormatError(f"config file {path} must end in .json, .yaml or .yml")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist" if not path.exists() else
                                f"config file {path} is not a file")
    if path.suffix == ".json":
        data = read_json(path, "the config file")
    else:
        data = _read_yaml(path)
    if not isinstance(data, dict):
        raise FileFormatError(f"config file {path} must hold a mapping at the top level, found {type(data).__name__}")
    return data


def _read_yaml(path: Path) -> Any:
    import yaml

    text = read_text(path, "the config file")
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:  # a tag such as !!python/object: never constructed
        raise FileFormatError(f"config file {path}{_where(error)}: {error.problem}; a config holds only plain mappings, "
                              "lists, strings, numbers and booleans") from None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise FileFormatError(f"config file {path} is not valid YAML{_where(error)}: {problem}") from None


def _where(error: Any) -> str:
    mark = getattr(error, "problem_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
