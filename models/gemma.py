"""Gemma 3 from transformers (``gemma3_text``, the text model of every Gemma 3 size): Llama's linears
with sandwich norms (a norm before and after attention and the MLP), ``1 + weight`` RMSNorms, per-head
query/key norms, an embedding scaled by √hidden and a tied head. The scale and the per-head norms
need no entry: a rotation commutes with a scalar, and the per-head norms read q_proj/k_proj's
outputs, which no rotation changes."""
from __future__ import annotations

from dataclasses import replace

from ..core.plugin_manager import hookimpl
from .llama import LLAMA

GEMMA3 = replace(
    LLAMA,
    name="gemma3",
    model_types=("gemma3_text",),
    norms={
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
    norm_offset=1.0,
    output_norms={"post_attention_layernorm": "self_attn.o_proj", "post_feedforward_layernorm": "mlp.down_proj"},
)


@hookimpl
def compquant_register_adapters(register) -> None:
    register("gemma3", GEMMA3)
