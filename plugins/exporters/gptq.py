"""The GPTQ checkpoint format (``qweight``/``qzeros``/``scales``/``g_idx`` per linear and a
``quantization_config`` with ``quant_method: gptq``), as AutoGPTQ, GPTQModel, vLLM and
transformers read it.

Zero points come in two conventions. ``gptq`` (v1, what every consumer reads) stores each zero
minus one, a historical off-by-one that consumers undo by adding one back; a zero of 0 would be
stored as -1, wrap to 2^bits - 1 in the packed word, and be read back as 2^bits: the consumer
would silently de-quantize the whole group wrongly. Such models are refused in v1 with the
count of affected groups. ``gptq-v2`` (GPTQModel's ``checkpoint_format: gptq_v2``) stores zeros
as they are and expresses every asymmetric grid, but only GPTQModel reads it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...core.block_store import SafetensorsWeights, materialize
from ...core.errors import ModelLoadError, UnknownPluginError
from ...core.exporters.base import Exporter, ExportJob, add_quantization_config, online_ops_problem
from ...core.plugin_manager import hookimpl, registry_for
from ...core.qlinear import QuantizedLinear

log = logging.getLogger(__name__)

PACKABLE_BITS = (2, 3, 4, 8)


class GptqExporter(Exporter):
    def __init__(self, version: int) -> None:
        self.version = version
        self.name = "gptq" if version == 1 else "gptq-v2"
        self.checkpoint_format = "gptq" if version == 1 else "gptq_v2"
        # auto prefers v1 (what every consumer reads), then v2 (GPTQModel; any zero point) before fake
        self.auto_rank = 20 if version == 1 else 30
        self.description = ("GPTQ qweight/qzeros/scales/g_idx, v1 zeros (AutoGPTQ, transformers, vLLM)" if version == 1
                            else "GPTQ with v2 zeros stored as they are (GPTQModel only)")

    def unsupported_layout(self, job: ExportJob) -> str | None:
        if not job.is_transformers_model:
            return "only transformers models can be written as GPTQ checkpoints; use --format fake"
        if (problem := online_ops_problem(job, "GPTQ")) is not None:
            return problem
        for name, layout in job.layouts.items():
            if layout.bits not in PACKABLE_BITS:
                return (f"GPTQ checkpoints hold {', '.join(map(str, PACKABLE_BITS))}-bit weights, not {layout.bits}-bit; "
                        "choose one of those --bits, or use --format fake")
            rows, columns = layout.shape
            if (rows * layout.bits) % 32 or (columns * layout.bits) % 32:
                return (f"{name} is {rows} x {columns}: GPTQ packs 32 / bits values per int32 word along both "
                        "dimensions, which these sizes do not fill; use --format fake")
        return None

    def unsupported(self, job: ExportJob) -> str | None:
        if (problem := self.unsupported_layout(job)) is not None:
            return problem
        if self.version == 1:
            zero_groups = {name: int((record.zero == 0).sum()) for name, record in job.records.items()}
            affected = {name: count for name, count in zero_groups.items() if count}
            if affected:
                first = next(iter(affected))
                return (f"{sum(affected.values())} groups in {len(affected)} linears (e.g. {first}) have a zero point "
                        "of 0, which the v1 convention stores as -1 and consumers misread as 2^bits; use --format "
                        "gptq-v2 (GPTQModel), --format compressed-tensors, or a symmetric grid")
        return None

    def annotate(self, folder: Path, records: dict[str, QuantizedLinear]) -> None:
        first = next(iter(records.values()))
        add_quantization_config(folder, {
            "quant_method": "gptq",
            "bits": first.bits,
            "group_size": first.group_size,
            "desc_act": first.act_order and not first.groups_in_order,
            "sym": first.symmetric,
            "true_sequential": True,
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
            "meta": {"quantizer": ["compquant"]},
        })

    def convert_linear(self, record: QuantizedLinear, dtype: torch.dtype) -> dict[str, Tensor]:
        """The four GPTQ tensors of one linear."""
        zeros = record.zero.to(torch.int16) - (1 if self.version == 1 else 0)
        return {
            "qweight": _pack(record.codes.to(torch.int16).T, record.bits, dim=0),
            "qzeros": _pack(zeros.T, record.bits, dim=1),
            "scales": record.scale.T.to(dtype).contiguous(),
            "g_idx": record.g_idx.to(torch.int32),
        }


    def reads(self, config: dict[str, Any]) -> bool:
        section = config.get("quantization_config", {})
        return section.get("quant_method") == "gptq" and section.get("checkpoint_format", "gptq") == self.checkpoint_format

    def load(self, folder: Path, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
        """The checkpoint de-quantized into a plain transformers model, so that it runs without GPTQ
        kernels (on any CPU)."""
        from accelerate import init_empty_weights
        from accelerate.utils import set_module_tensor_to_device
        from transformers import AutoConfig, AutoModelForCausalLM

        section = config["quantization_config"]
        bits = section["bits"]
        if section.get("pack_dtype", "int32") != "int32":
            raise ModelLoadError(f"{folder}: GPTQ checkpoints packed in {section.get('pack_dtype')} are not ones compquant "
                                 "reads (int32 words only)")
        model_config = AutoConfig.from_pretrained(folder)
        del model_config.quantization_config
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        try:  # the checkpoint holds the linears the adapter made (experts the class fuses: one linear each)
            registry_for(None).adapter_for(model).prepare(model)
        except UnknownPluginError:
            pass  # no adapter knows the class: its own linears are the checkpoint's
        weights = SafetensorsWeights(folder)
        linears = sorted({name.removesuffix(".qweight") for name in weights.names() if name.endswith(".qweight")})
        for linear in linears:
            tensors = {part: weights.get(f"{linear}.{part}") for part in ("qweight", "qzeros", "scales", "g_idx")}
            set_module_tensor_to_device(model, f"{linear}.weight", "cpu",
                                        dequantize_linear(tensors, bits, self.checkpoint_format), dtype=dtype)
        materialize(model, "", weights, torch.device("cpu"), dtype)  # everything that is not packed
        model.tie_weights()
        empty = [name for name, parameter in model.named_parameters() if parameter.is_meta]
        if empty:
            raise ModelLoadError(f"{folder}: the GPTQ checkpoint has no tensors for {', '.join(empty[:5])}")
        log.info("de-quantized the %d-bit GPTQ checkpoint %s (%d linears)", bits, folder, len(linears))
        return model.eval()


def dequantize_linear(tensors: dict[str, Tensor], bits: int, checkpoint_format: str) -> Tensor:
    """The dense (out, in) weight of one linear from its ``qweight``, ``qzeros``, ``scales`` and
    ``g_idx``, undoing the v1 off-by-one of the zeros for ``checkpoint_format`` "gptq"."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    scales, g_idx = tensors["scales"], tensors["g_idx"].long()
    groups, out_features = scales.shape
    offset = 2 ** (bits - 1)  # unpack_from_int32 returns signed values
    codes = unpack_from_int32(tensors["qweight"], bits, torch.Size((len(g_idx), out_features)), packed_dim=0)
    zeros = unpack_from_int32(tensors["qzeros"], bits, torch.Size((groups, out_features)), packed_dim=1)
    zeros = zeros.to(torch.float32) + offset + (1 if checkpoint_format == "gptq" else 0)
    scale = scales.to(torch.float32)[g_idx]
    return (scale * (codes.to(torch.float32) + offset - zeros[g_idx])).T.contiguous()


def _pack(values: Tensor, bits: int, dim: int) -> Tensor:
    """Unsigned ``bits``-bit values packed densely into int32 words along ``dim``: value k of
    every run of 32 occupies bits [bits*k, bits*(k+1)) of that run's little-endian words, which is
    GPTQ's layout for 2, 4 and 8 bits and its split-word layout for 3 bits."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 2 ** (bits - 1)  # pack_to_int32 takes signed values and adds this offset back
    return pack_to_int32((values - offset).to(torch.int8).contiguous(), bits, packed_dim=dim)


@hookimpl
def compquant_register_exporters(register) -> None:
    for version in (1, 2):
        exporter = GptqExporter(version)
        register(exporter.name, exporter)
