"""Vision transformers from timm: DeiT (with or without the distillation token) and plain ViT."""
from __future__ import annotations

from ..core.adapter import ArchitectureAdapter
from ..core.plugin_manager import hookimpl

DEIT = ArchitectureAdapter(
    name="deit",
    model_types=(),
    model_classes=("VisionTransformer", "VisionTransformerDistilled"),
    blocks="blocks",
    groups=(("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",)),
    norms={"norm1": ("attn.qkv",), "norm2": ("mlp.fc1",)},
    final_norm="norm",
    head="head",
    residual_writers=("attn.proj", "mlp.fc2"),
)


@hookimpl
def compquant_register_adapters(register) -> None:
    register("deit", DEIT)
