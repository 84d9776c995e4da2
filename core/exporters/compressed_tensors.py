"""compressed-tensors ``pack-quantized``: the format vLLM loads natively and transformers loads
through ``CompressedTensorsConfig``. The packing and the config section are the library's own.

What the format cannot express is refused: groups out of column order (compressed-tensors 0.20
removed the group index of dynamic act-order; static groups are fine), a last group narrower
than the group size, and online input operations.

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

from .base import Exporter, ExportJob, dense_state_dict, online_ops_problem, write_transformers_checkpoint

FORMAT = "pack-quantized"


class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"
    description = "compressed-tensors pack-quantized (vLLM, transformers with compressed-tensors installed)"

    def unsupported(self, job: ExportJob) -> str | None:
        if not job.is_transformers_model:
            return "only transformers models can be written as compressed-tensors; use --format fake"
        if (problem := online_ops_problem(job, "compressed-tensors")) is not None:
            return problem
        for name, record in job.records.items():
            if not record.groups_in_order:
                return (f"{name} has act-order groups out of column order, which compressed-tensors >= 0.20 cannot store "
                        "(no group index); quantize with the solver option static_groups=true, or use --format gptq")
            columns = record.shape[1]
            if record.group_size != -1 and columns % record.group_size:
                return (f"{name} has {columns} input columns, not a multiple of the group size {record.group_size}; "
                        "choose a group size that divides every layer's width (SmolLM2: 64 or 32), or use --format gptq")
        return None

    def write(self, job: ExportJob, folder: Path) -> dict[str, Any]:
        from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

        schemes = _schemes(job)
        state = dense_state_dict(job)
        for name, record in job.records.items():
            scheme = schemes[_scheme_key(record)]
            offset = 2 ** (record.bits - 1)  # compressed-tensors stores signed codes and zero points
            module_state = {
                "weight": record.dequantize(torch.float32),
                "weight_scale": record.scale.to(job.float_dtype),
                "weight_zero_point": (record.zero.to(torch.int16) - offset).to(torch.int8),
            }
            del state[f"{name}.weight"]
            for key, value in PackedQuantizationCompressor.compress(module_state, scheme).items():
                state[f"{name}.{key}"] = value.to(job.float_dtype) if key == "weight_scale" else value
        config = QuantizationConfig(
            config_groups={f"group_{i}": scheme for i, scheme in enumerate(schemes.values())},
            format=FORMAT,
            quantization_status=QuantizationStatus.COMPRESSED,
        )
        write_transformers_checkpoint(job, folder, state, quantization_config=None)
        ModelCompressor(quantization_config=config).update_config(str(folder))
        return {"format": self.name, "compressed_tensors_format": FORMAT}


def _scheme_key(record) -> tuple[int, int, bool, bool]:
    return record.bits, record.group_size, record.symmetric, record.act_order


def _schemes(job: ExportJob) -> dict[tuple, Any]:
    """One scheme per distinct grid, targeting its linears by exact name."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    targets: dict[tuple, list[str]] = {}
    for name, record in sorted(job.records.items()):
        targets.setdefault(_scheme_key(record), []).append(name)
    schemes = {}
    for (bits, group_size, symmetric, act_order), names in targets.items():
        grouped = group_size != -1
        weights = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=symmetric,
            strategy="group" if grouped else "channel",
            group_size=group_size if grouped else None,
            actorder="weight" if act_order else None,
        )
        schemes[(bits, group_size, symmetric, act_order)] = QuantizationScheme(targets=names, weights=weights)
    return schemes
