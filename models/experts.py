"""Mixture-of-experts layers as transformers 5 builds them, in a form the calibration loop can
quantize, and the adapter kind that describes them.

transformers 5 keeps the experts of a sparse layer (Mixtral, Qwen2-MoE, Qwen3-MoE and the classes
decorated with ``use_experts_implementation``) fused in two 3-D parameters: ``gate_up_proj``
(experts, 2·intermediate, hidden: the gate's rows, then the up projection's) and ``down_proj``
(experts, hidden, intermediate), run by one forward that sends each token to its top-k experts.
They are no ``nn.Linear``s: no hook sees an expert's inputs and no exporter finds its weights.
`unfuse_experts` puts `RoutedExperts` in their place: one `ExpertMLP` of three ``nn.Linear``s per
expert, named as the family's checkpoints name them (``from_pretrained`` fuses those names again on
load, so a fake-quantized export reloads in plain transformers), computing the same function.

Inside the calibration loop `RoutedExperts` runs every expert on every token under a mask of the
tokens its router chose (`compquant.core.routing`), so each expert is calibrated on exactly its
routed tokens and an expert with too few of them can fall back to all of them.

`MoEAdapter` is a dense adapter plus where the experts, their router and any shared expert are.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ..core.adapter import ArchitectureAdapter
from ..core.routing import UnfusedExperts, feeds_every_token, routed_to

#: The fused layout's flags (set by transformers' ``use_experts_implementation``), as unfusing needs them.
SUPPORTED_LAYOUT = {"is_transposed": False, "has_bias": False, "is_concatenated": True, "has_gate": True,
                    "has_post_expert_norm": False}


class ExpertMLP(nn.Module):
    """One expert, ``down(act(gate(x)) · up(x))``, its linears under the checkpoint's ``names``."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Linear, up: nn.Linear, down: nn.Linear,
                 act_fn: nn.Module) -> None:
        super().__init__()
        self.names = names
        for name, linear in zip(names, (gate, up, down)):
            self.add_module(name, linear)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class RoutedExperts(UnfusedExperts):
    """The experts of one sparse layer as `ExpertMLP`s, called as the fused module is: hidden states
    (tokens, hidden), each token's top-k expert indices and their weights."""

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        output = torch.zeros_like(hidden_states)
        every_token = feeds_every_token()
        for index, expert in enumerate(self):
            token, position = torch.where(top_k_index == index)
            if every_token:  # calibration: every token, under the mask of the routed ones
                mask = torch.zeros(hidden_states.shape[0], dtype=torch.bool, device=hidden_states.device)
                with routed_to(mask.index_fill_(0, token, True)):
                    result = expert(hidden_states)[token]
            elif token.numel():
                result = expert(hidden_states[token])
            else:
                continue
            output.index_add_(0, token, (result * top_k_weights[token, position, None]).to(output.dtype))
        return output


def layout_problem(fused: nn.Module) -> str | None:
    """Why ``fused`` is not a layout `unfuse_experts` reads, or None."""
    for flag, supported in SUPPORTED_LAYOUT.items():
        if getattr(fused, flag, supported) != supported:
            return (f"its {type(fused).__name__} stores the experts with {flag}={getattr(fused, flag)}, and compquant "
                    f"unfuses {SUPPORTED_LAYOUT} only; write an adapter whose prepare() unfuses this layout")
    if not isinstance(getattr(fused, "gate_up_proj", None), Tensor) or not isinstance(getattr(fused, "down_proj", None),
                                                                                       Tensor):
        return f"its {type(fused).__name__} has no fused gate_up_proj and down_proj tensors"
    return None


def unfuse_experts(fused: nn.Module, names: tuple[str, str, str]) -> RoutedExperts:
    """``fused``'s experts as `RoutedExperts` whose linears are named ``names`` (gate, up, down). The
    weights are copied (a meta tensor stays meta, for low-memory skeletons): views of the fused
    storage would share one storage, which the exporters write once."""
    if (problem := layout_problem(fused)) is not None:
        raise NotImplementedError(problem)

    def linear(weight: Tensor) -> nn.Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=fused.gate_up_proj.requires_grad)
        return layer

    experts = []
    for gate_up, down in zip(fused.gate_up_proj, fused.down_proj):
        gate, up = gate_up.chunk(2, dim=0)
        experts.append(ExpertMLP(names, linear(gate), linear(up), linear(down), fused.act_fn))
    return RoutedExperts(experts)


@dataclass(frozen=True)
class MoEAdapter(ArchitectureAdapter):
    """A dense adapter (``groups`` and ``norms`` describe a dense layer, whose MLP is ``mlp`` with the
    linears ``dense_linears``: gate, up, down) whose sparse blocks hold fused ``experts`` behind a
    ``router``. ``expert_linears`` are the checkpoint's names of each expert's gate, up and down. A
    ``shared_expert`` (a dense MLP every token passes, named as the dense one, called before the
    routed experts as Qwen2-MoE does) is quantized like the dense MLP; the router and the
    ``shared_expert_gate`` stay in full precision, as readers of the norm for the rotations."""

    mlp: str = "mlp"
    dense_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    experts: str = "mlp.experts"
    expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    router: str = "mlp.gate"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None

    def misfit(self, model: nn.Module) -> str | None:
        try:
            fused = _find(self.block_list(model)[0], self.experts)
        except (AttributeError, TypeError, IndexError):
            fused = None
        if fused is not None and not isinstance(fused, RoutedExperts):
            return layout_problem(fused)  # its linears exist once prepare() has unfused them
        return super().misfit(model)

    def prepare(self, model: nn.Module) -> None:
        for block in self.block_list(model):
            fused = _find(block, self.experts)
            if fused is not None and not isinstance(fused, RoutedExperts):
                block.set_submodule(self.experts, unfuse_experts(fused, self.expert_linears))

    def for_block(self, block: nn.Module) -> ArchitectureAdapter:
        """A sparse block's description: the dense MLP's groups once per MLP (the shared expert, then
        each expert, in the order the block calls them), its norm readers with the router and the
        shared expert's gate, every MLP's down projection as a residual writer and MLP output."""
        experts = _find(block, self.experts)
        if not isinstance(experts, RoutedExperts):
            return self  # a dense layer (Qwen-MoE's mlp_only_layers)
        mlps = [(f"{self.experts}.{index}", self.expert_linears) for index in range(len(experts))]
        if self.shared_expert is not None and _find(block, self.shared_expert) is not None:
            mlps.insert(0, (self.shared_expert, self.dense_linears))

        def in_mlp(names: tuple[str, ...]) -> bool:
            return all(name.startswith(f"{self.mlp}.") for name in names)

        def each_mlp(names: tuple[str, ...]) -> list[tuple[str, ...]]:
            """The dense MLP's linears ``names`` in the same roles, once per MLP of the block."""
            roles = [self.dense_linears.index(name.removeprefix(f"{self.mlp}.")) for name in names]
            return [tuple(f"{path}.{linears[role]}" for role in roles) for path, linears in mlps]

        dense_mlp = [group for group in self.groups if in_mlp(group)]
        start = self.groups.index(dense_mlp[0])
        per_mlp = zip(*map(each_mlp, dense_mlp))  # one MLP's groups after another: the order they run
        groups = (*self.groups[:start], *(group for mlp in per_mlp for group in mlp),
                  *(group for group in self.groups[start:] if not in_mlp(group)))
        gates = tuple(name for name in (self.router, self.shared_expert_gate) if name and _find(block, name) is not None)
        norms = {norm: (*gates, *(name for group in each_mlp(readers) for name in group)) if in_mlp(readers) else readers
                 for norm, readers in self.norms.items()}
        downs = tuple(group[0] for group in each_mlp((f"{self.mlp}.{self.dense_linears[2]}",)))
        writers = tuple(name for name in self.residual_writers if not in_mlp((name,))) + downs
        dense = {field.name: getattr(self, field.name) for field in fields(ArchitectureAdapter)}
        return ArchitectureAdapter(**{**dense, "groups": groups, "norms": norms, "residual_writers": writers,
                                      "mlp_output": downs})


def _find(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None
