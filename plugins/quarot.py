"""QuaRot (Ashkboos et al., 2024): rotate the full-precision model so that its weights have no
outliers, without changing its function (docs/transforms.md, "QuaRot"), for RMSNorm models.

In order: untie a tied head, fold each RMSNorm's scale into the linears that read it (the norms
become scale-free and so rotation-invariant), rotate the residual stream by R1 (embedding, every
reader and writer of the residual, the head), rotate each attention head's value/output pair by R2
(per head, fully offline, as SpinQuant places it), and put an online Hadamard R4 in front of the
MLP's output projection (its weight takes the matching rotation). Optionally (``r3``) an online
Hadamard R3 turns every head's query and key after RoPE, for users who go on to quantize the KV
cache: q·kᵀ is unchanged, and the cache stores the rotated keys. All edits run in float64.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..core.adapter import ArchitectureAdapter
from ..core.online import attach_attention_op, attach_input_op
from ..core.plugin_manager import hookimpl
from ..core.transform import Transform, TransformContext, TransformOptions
from .hadamard import HadamardSizeError, OnlineHadamard, hadamard, random_hadamard, random_orthogonal

log = logging.getLogger(__name__)


class QuaRotOptions(TransformOptions):
    r1: bool = Field(True, description="rotate the residual stream (fold the norms, untie the head)")
    rotation: Literal["hadamard", "random"] = Field("hadamard", description="R1/R2: randomized Hadamard or random orthogonal")
    fallback_random: bool = Field(False, description="use a random orthogonal R1/R2 where no Hadamard of the size exists")
    r2: bool = Field(True, description="rotate each head's value/output pair")
    r4: bool = Field(True, description="online Hadamard in front of the MLP output projection")
    r3: bool = Field(False, description="online Hadamard on post-RoPE queries and keys (for KV-cache quantization)")


class QuaRot(Transform):
    Options = QuaRotOptions

    def attaches_online_ops(self, options: QuaRotOptions) -> bool:
        return options.r4 or options.r3

    def apply(self, model: nn.Module, adapter: ArchitectureAdapter, options: QuaRotOptions, context: TransformContext) -> None:
        generator = torch.Generator().manual_seed(context.seed)
        if options.r1:
            prepare_for_rotation(model, adapter)
            hidden = model.get_submodule(adapter.embedding).weight.shape[1]
            rotate_residual(model, adapter, rotation_matrix(hidden, options, generator))
        if options.r2:
            head_dim = attention_head_dim(model)
            rotate_heads(model, adapter, [rotation_matrix(head_dim, options, generator) for _ in adapter.block_list(model)])
        if options.r4:
            rotate_mlp_output(model, adapter)
        if options.r3:
            rotate_query_key(model, adapter)


def rotation_matrix(n: int, options: QuaRotOptions, generator: torch.Generator) -> Tensor:
    if options.rotation == "random":
        return random_orthogonal(n, generator)
    try:
        return random_hadamard(n, generator)
    except HadamardSizeError as error:
        if not options.fallback_random:
            raise HadamardSizeError(f"{error}: set the QuaRot option fallback_random=true (on the command line "
                                    "--transform-option quarot.fallback_random=true) to use one for this size") from None
        log.warning("no Hadamard matrix of size %d; using a seeded random orthogonal matrix", n)
        return random_orthogonal(n, generator)


def _check_rotatable(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    for block in adapter.block_list(model):
        for norm_name in adapter.for_block(block).norms:
            norm = block.get_submodule(norm_name)
            if getattr(norm, "bias", None) is not None or isinstance(norm, nn.LayerNorm):
                raise ValueError(
                    f"{type(norm).__name__} {norm_name!r} subtracts the mean or adds a bias, so a rotation does not "
                    "commute with it; rotation transforms support RMSNorm models only"
                )
    missing = [f for f in ("embedding", "final_norm", "head") if getattr(adapter, f) is None]
    if missing or not adapter.residual_writers:
        raise ValueError(f"adapter {adapter.name!r} does not describe {missing or ['residual_writers']}, which rotations need")
    _check_output_norms(model, adapter)


def _check_output_norms(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    """A sandwich norm scales a writer's normalised output channel by channel before it reaches the
    residual stream, so the residual can only be rotated through it when that scale is one number:
    Q·diag(γ)·Qᵀ is diagonal for every rotation Q only when γ is constant, and no change of the writer
    can make up for it (the norm divides by the output's own RMS)."""
    uneven = []
    for index, block in enumerate(adapter.block_list(model)):
        for norm_name, writer in adapter.for_block(block).output_norms.items():
            scale = block.get_submodule(norm_name).weight.detach().double() + adapter.norm_offset
            if scale.max() - scale.min() > 1e-6 * scale.abs().max():
                uneven.append((f"{adapter.blocks}.{index}.{norm_name}", writer, scale))
    if uneven:
        name, writer, scale = uneven[0]
        raise ValueError(
            f"{name} scales the normalised output of {writer} channel by channel (its scales range from "
            f"{scale.min():.3g} to {scale.max():.3g}) before it is added to the residual stream, and a rotation of the "
            f"residual stream (R1) cannot pass a per-channel scale that sits behind a normalisation; {len(uneven)} such "
            "norms in this model. Use QuaRot with r1: false (R2, R4 and R3 do not rotate the residual stream) or no "
            "rotation"
        )


def _scale(module: nn.Module, weight: Tensor) -> None:
    module.weight.data = weight.to(module.weight.dtype)


def prepare_for_rotation(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    """Untie the head and fold every norm's scale into its readers; the model's function is kept."""
    _check_rotatable(model, adapter)
    embedding, head = model.get_submodule(adapter.embedding), model.get_submodule(adapter.head)
    if head.weight is embedding.weight:
        log.info("untying %s from %s: the folded final norm makes them differ", adapter.head, adapter.embedding)
        head.weight = nn.Parameter(embedding.weight.detach().clone())
        if hasattr(model, "config"):
            model.config.tie_word_embeddings = False
    norms = [(block.get_submodule(n), [block.get_submodule(r) for r in readers])
             for block in adapter.block_list(model) for n, readers in adapter.for_block(block).norms.items()]
    norms.append((model.get_submodule(adapter.final_norm), [head]))
    for norm, readers in norms:
        scale = norm.weight.data.double() + adapter.norm_offset
        for reader in readers:
            _scale(reader, reader.weight.data.double() * scale)
        norm.weight.data.fill_(1.0 - adapter.norm_offset)


def rotate_residual(model: nn.Module, adapter: ArchitectureAdapter, rotation: Tensor) -> None:
    """h ↦ h·Q on the residual stream: the embedding and the writers' outputs turn, the readers undo it."""
    embedding = model.get_submodule(adapter.embedding)
    _scale(embedding, embedding.weight.data.double() @ rotation)
    readers = [model.get_submodule(adapter.head)]
    for block in adapter.block_list(model):
        layout = adapter.for_block(block)
        readers += [block.get_submodule(r) for rs in layout.norms.values() for r in rs]
        for name in layout.residual_writers:
            writer = block.get_submodule(name)
            _scale(writer, rotation.T @ writer.weight.data.double())
            if writer.bias is not None:
                writer.bias.data = (writer.bias.data.double() @ rotation).to(writer.bias.dtype)
    for reader in readers:
        _scale(reader, reader.weight.data.double() @ rotation)


def rotate_heads(model: nn.Module, adapter: ArchitectureAdapter, rotations: list[Tensor]) -> None:
    """Each value head's output v ↦ v·R (one R per block, shared by its heads); the attention output
    projection undoes it per head. Attention is linear in V, so the function is kept."""
    if adapter.value_output is None:
        raise ValueError(f"adapter {adapter.name!r} does not name its value/output projections; disable r2")
    value_name, output_name = adapter.value_output
    for block, rotation in zip(adapter.block_list(model), rotations):
        value, output = block.get_submodule(value_name), block.get_submodule(output_name)
        head_dim = rotation.shape[0]
        w = value.weight.data.double().reshape(-1, head_dim, value.in_features)
        _scale(value, torch.einsum("dk,hdi->hki", rotation, w).reshape(value.weight.shape))
        if value.bias is not None:
            value.bias.data = (value.bias.data.double().reshape(-1, head_dim) @ rotation).reshape(-1).to(value.bias.dtype)
        o = output.weight.data.double().reshape(output.out_features, -1, head_dim)
        _scale(output, (o @ rotation).reshape(output.weight.shape))


def rotate_mlp_output(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    """Online Hadamard on the input of each MLP output projection (every expert's, in a sparse
    block), its weight W ↦ W·Hᵀ."""
    if adapter.mlp_output is None:
        raise ValueError(f"adapter {adapter.name!r} does not name its MLP output projection; disable r4")
    for block in adapter.block_list(model):
        for name in adapter.for_block(block).mlp_outputs():
            linear = block.get_submodule(name)
            _scale(linear, linear.weight.data.double() @ hadamard(linear.in_features).T)
            attach_input_op(linear, OnlineHadamard(linear.in_features).to(linear.weight.device))


def rotate_query_key(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    """Online Hadamard on each head's query and key after RoPE (R3). Both turn by the same H, so the
    attention scores q·kᵀ are unchanged; the key op runs before the KV cache stores the keys."""
    if adapter.attention is None:
        raise ValueError(f"adapter {adapter.name!r} does not name its attention module; disable r3")
    head_dim = attention_head_dim(model)
    for block in adapter.block_list(model):
        attention = block.get_submodule(adapter.attention)
        device = next(attention.parameters()).device
        for site in ("query", "key"):
            attach_attention_op(model, attention, OnlineHadamard(head_dim).to(device), site)


def attention_head_dim(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@hookimpl
def compquant_register_transforms(register) -> None:
    register("quarot", QuaRot())
