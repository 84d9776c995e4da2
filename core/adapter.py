"""What an architecture adapter is: a small declarative description of where a model keeps its
blocks, the linears inside a block (in true-sequential order) and the norms that feed them.

Subclass it only for what a family really needs beyond these fields; most families are one
instance of `ArchitectureAdapter`. Two methods are the places to override (docs/plugins.md,
"Architecture adapters"): `prepare` brings a model into a form made of ``nn.Linear``s (experts
fused in 3-D tensors, unfused), and `for_block` describes one block where blocks differ (dense and
mixture-of-experts layers in one model, a number of experts read off the block).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where the quantizable parts of a model family are.

    ``groups`` are the true-sequential groups of linears inside one block, as paths relative to the
    block: the calibration loop quantizes one group after another, recomputing the inputs in
    between. The linears of a group must read the same input tensor (they share its statistics).
    ``norms`` maps a norm inside a block to the linears it feeds; ``final_norm`` feeds ``head``.
    ``norm_offset`` is what every norm adds to its weight before scaling (0 for the usual RMSNorm
    ``x̂·w``, 1 for Gemma's ``x̂·(1 + w)``). ``output_norms`` are sandwich norms: a norm between a
    residual writer and the residual stream, mapped to the writer whose output it normalises
    (Gemma's post-attention and post-feedforward norms). Rotation transforms also need
    ``residual_writers`` (the linears that add into the residual stream), ``value_output`` (the
    value projection and the attention output projection, rotated per head) and ``mlp_output`` (the
    linear after the MLP's nonlinearity, or a tuple of them where a block has several MLPs); QuaRot's
    optional R3 needs ``attention``, the module that applies the rotary embedding to queries and keys.
    ``norms`` may also map to readers that stay in full precision (a router): the rotations fold and
    turn them, the calibration loop quantizes only ``groups``.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    norms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    norm_offset: float = 0.0
    output_norms: Mapping[str, str] = field(default_factory=dict)
    embedding: str | None = None
    final_norm: str | None = None
    head: str | None = None
    residual_writers: tuple[str, ...] = ()
    value_output: tuple[str, str] | None = None
    mlp_output: str | tuple[str, ...] | None = None
    attention: str | None = None
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)
    model_classes: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter describes ``model``: by ``model.config.model_type`` (transformers) or
        by the model's class name (``model_classes``, for libraries without a config object)."""
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types or type(model).__name__ in self.model_classes

    def misfit(self, model: nn.Module) -> str | None:
        """What of this description ``model`` lacks (its blocks, a linear of its first block, the
        embedding), or None when the description fits it."""
        try:
            first = self.block_list(model)[0]
        except (AttributeError, TypeError, IndexError):
            return f"it has no blocks at {self.blocks!r}"
        for name in self.for_block(first).linears():
            try:
                first.get_submodule(name)
            except AttributeError:
                return f"its blocks have no {name!r}"
        if self.embedding is not None:
            try:
                model.get_submodule(self.embedding)
            except AttributeError:
                return f"it has no embedding at {self.embedding!r}"
        return None

    def block_list(self, model: nn.Module) -> nn.ModuleList | nn.Sequential:
        blocks = model.get_submodule(self.blocks)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"adapter {self.name!r}: {self.blocks!r} is a {type(blocks).__name__}, not a ModuleList or Sequential")
        return blocks

    def linears(self) -> list[str]:
        """The quantizable linears of a block, in the order they are quantized."""
        return [name for group in self.groups for name in group]

    def mlp_outputs(self) -> tuple[str, ...]:
        """``mlp_output`` as a tuple (empty when unset)."""
        if self.mlp_output is None:
            return ()
        return (self.mlp_output,) if isinstance(self.mlp_output, str) else self.mlp_output

    def prepare(self, model: nn.Module) -> None:
        """Bring ``model`` into the form the transforms and the calibration loop work on, before either
        runs; calling it again changes nothing. Nothing for most families; the mixture-of-experts
        adapters replace experts fused in 3-D tensors by one ``nn.Linear`` per expert projection,
        named as the family's checkpoints name them, computing the same function."""

    def for_block(self, block: nn.Module) -> ArchitectureAdapter:
        """This adapter as it describes ``block`` (its groups, norms, residual writers and MLP
        outputs); every per-block question is asked through it. The adapter itself unless a family's
        blocks differ from one another."""
        return self

    def run(self, model: nn.Module, batch: Any) -> Any:
        """Run the whole model on one calibration batch."""
        return model(batch, **self.forward_kwargs)


def hidden_states(output: Any) -> Tensor:
    """The hidden states in a block's output (transformers' blocks return a tuple, timm's a tensor)."""
    return output[0] if isinstance(output, tuple) else output


def run_block(block: nn.Module, hidden: Sequence[Tensor], kwargs: Sequence[dict[str, Any]]) -> list[Tensor]:
    """The block's hidden-state outputs on each batch of ``hidden`` with its keyword arguments."""
    return [hidden_states(block(h, **kw)) for h, kw in zip(hidden, kwargs)]
