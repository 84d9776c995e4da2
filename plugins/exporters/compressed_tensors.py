"""compressed-tensors ``pack-quantized``: the format vLLM loads natively and transformers loads
through ``CompressedTensorsConfig``. The packing and the config section are the library's own.

What the format cannot express is refused: groups out of column order (compressed-tensors 0.20
removed the group index of dynamic act-order; static groups are fine), a last group narrower
than the group size, online operations, and asymmetric grids on experts that the model's class
keeps fused in 3-D tensors (transformers 5.24 de-quantizes those into the fused tensors from the
packed codes and scales alone, without their zero points, and fails to load them).

Loading in transformers: symmetric checkpoints load with plain ``from_pretrained``. Asymmetric
ones are written as the format specifies (zero points packed along the output dimension), but
transformers 5.23 with compressed-tensors 0.20 builds the compressed module template without
packing the zero point and refuses the shapes; they load with
``from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True))``, which
`compquant.load_model` passes for every compressed-tensors folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torch import nn

from ...core.exporters.base import Exporter, ExportJob, online_ops_problem
from ...core.plugin_manager import hookimpl
from ...core.qlinear import QuantizedLinear
from ...core.routing import unfused_expert_paths

FORMAT = "pack-quantized"


class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"
    description = "compressed-tensors pack-quantized (vLLM, transformers with compressed-tensors installed)"
    auto_rank = 10

    def unsupported_layout(self, job: ExportJob) -> str | None:
        if not job.is_transformers_model:
            return "only transformers models can be written as compressed-tensors; use --format fake"
        if (problem := online_ops_problem(job, "compressed-tensors")) is not None:
            return problem
        experts = tuple(f"{path}." for path in unfused_expert_paths(job.model))
        asymmetric = [name for name, layout in job.layouts.items() if name.startswith(experts) and not layout.symmetric]
        if asymmetric:
            return (f"{asymmetric[0]} and {len(asymmetric) - 1} other expert linears have asymmetric grids, and "
                    "transformers loads compressed-tensors experts into its fused 3-D tensors without their zero "
                    "points; quantize with a symmetric grid (sym: true), or use --format gptq-v2 or --format fake")
        for name, layout in job.layouts.items():
            if not layout.groups_in_order:
                return (f"{name} has act-order groups out of column order, which compressed-tensors >= 0.20 cannot store "
                        "(no group index); quantize with the solver option static_groups=true, or use --format gptq")
            columns = layout.shape[1]
            if layout.group_size != -1 and columns % layout.group_size:
                return (f"{name} has {columns} input columns, not a multiple of the group size {layout.group_size}; "
                        "choose a group size that divides every layer's width (SmolLM2: 64 or 32), or use --format gptq")
        return None

    def convert_linear(self, record: QuantizedLinear, dtype: torch.dtype) -> dict[str, Tensor]:
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

        offset = 2 ** (record.bits - 1)  # compressed-tensors stores signed codes and zero points
        state = {
            "weight": record.dequantize(torch.float32),
            "weight_scale": record.scale.to(torch.float32),
            "weight_zero_point": (record.zero.to(torch.int16) - offset).to(torch.int8),
        }
        compressed = PackedQuantizationCompressor.compress(state, _scheme(record, targets=["Linear"]))
        compressed["weight_scale"] = compressed["weight_scale"].to(dtype)
        return compressed

    def reads(self, config: dict[str, Any]) -> bool:
        return config.get("quantization_config", {}).get("quant_method") == "compressed-tensors"

    def load(self, folder: Path, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
        """Through transformers, de-quantized on load into plain weights that run anywhere (this also
        sidesteps transformers 5.23 refusing asymmetric pack-quantized zero points otherwise)."""
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))

    def annotate(self, folder: Path, records: dict[str, QuantizedLinear]) -> None:
        from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

        targets: dict[tuple, list[str]] = {}
        for name, record in sorted(records.items()):
            targets.setdefault(_grid_key(record), []).append(name)
        schemes = [_scheme(records[names[0]], targets=names) for names in targets.values()]
        config = QuantizationConfig(
            config_groups={f"group_{i}": scheme for i, scheme in enumerate(schemes)},
            format=FORMAT,
            quantization_status=QuantizationStatus.COMPRESSED,
        )
        ModelCompressor(quantization_config=config).update_config(str(folder))


def _grid_key(record: QuantizedLinear) -> tuple[int, int, bool, bool]:
    return record.bits, record.group_size, record.symmetric, record.act_order


def _scheme(record: QuantizedLinear, targets: list[str]) -> Any:
    """The compressed-tensors scheme of ``record``'s grid, applied to ``targets`` (exact names)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    grouped = record.group_size != -1
    weights = QuantizationArgs(
        num_bits=record.bits,
        type="int",
        symmetric=record.symmetric,
        strategy="group" if grouped else "channel",
        group_size=record.group_size if grouped else None,
        actorder="weight" if record.act_order else None,
    )
    return QuantizationScheme(targets=targets, weights=weights)


@hookimpl
def compquant_register_exporters(register) -> None:
    register(CompressedTensorsExporter.name, CompressedTensorsExporter())
