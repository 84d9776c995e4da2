"""The Llama family from transformers: Llama, Mistral, Qwen2 and Qwen3 share the layout. Qwen3's
per-head q_norm/k_norm need no entry: they read q_proj/k_proj's outputs, which R1 and R2 leave
unchanged, and R3 turns queries and keys after RoPE, so after the norms too."""
from __future__ import annotations

from ..core.adapter import ArchitectureAdapter
from ..core.plugin_manager import hookimpl

LLAMA = ArchitectureAdapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    norms={
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
    embedding="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    value_output=("self_attn.v_proj", "self_attn.o_proj"),
    mlp_output="mlp.down_proj",
    attention="self_attn",
    forward_kwargs={"use_cache": False},
)


@hookimpl
def compquant_register_adapters(register) -> None:
    register("llama", LLAMA)
