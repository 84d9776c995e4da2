"""Sparse mixture-of-experts decoders from transformers 5, whose experts are fused in 3-D tensors:
Qwen2-MoE and Qwen3-MoE (one layout; Qwen2-MoE adds a shared expert and its gate) and Mixtral (its
checkpoints name an expert's gate, up and down w1, w3 and w2). Attention, norms and Qwen-MoE's dense
layers are Llama's; `compquant.models.experts` does the rest."""
from __future__ import annotations

from dataclasses import fields

from ..core.adapter import ArchitectureAdapter
from ..core.plugin_manager import hookimpl
from .experts import MoEAdapter
from .llama import LLAMA

_DENSE = {field.name: getattr(LLAMA, field.name) for field in fields(ArchitectureAdapter)}

QWEN_MOE = MoEAdapter(**{**_DENSE, "name": "qwen-moe", "model_types": ("qwen2_moe", "qwen3_moe")},
                      shared_expert="mlp.shared_expert", shared_expert_gate="mlp.shared_expert_gate")
MIXTRAL = MoEAdapter(**{**_DENSE, "name": "mixtral", "model_types": ("mixtral",)}, expert_linears=("w1", "w3", "w2"))


@hookimpl
def compquant_register_adapters(register) -> None:
    register("qwen-moe", QWEN_MOE)
    register("mixtral", MIXTRAL)
