"""Learned block reconstruction: the learner plugin kind and the frame that trains one (docs/learners.md).

A learner works on one transformer block at a time, inside the calibration loop, before the block's
linears are quantized. It is handed a `BlockTask`: the block, the block's calibration inputs on the
quantized path, the full-precision block's outputs (the targets), the following blocks in full
precision with their targets (for look-ahead losses), the grid and a seed. It trains parameters of
its own and leaves the block with new dense weights and, where it learns clipping, a learned
interval per row and group of each linear (`GroupRanges`). The run's solver then quantizes each
linear for real on those weights and that grid: RTN rounds to nearest on the learned grid (what
OmniQuant does), GPTQ compensates on it.

`GradientLearner` is the frame most learners share: each linear's weight becomes a differentiable
`LinearParametrization`; the block runs with those weights fake-quantized (straight-through
rounding); the loss is the mean squared error to the targets plus, with cross-layer learning
(``lookahead`` ≥ 1), ``lambda_cl`` times the error after each following full-precision block; an
optimizer (AdamW without weight decay by default) steps once per calibration batch, in a seeded
order, epoch after epoch; at the end every parametrization is folded into a dense weight and its
range. `BlockLearning` is how the calibration loop runs a learner on a block.
"""
from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from .adapter import ArchitectureAdapter, hidden_states, run_block
from .progress import progress
from .quantizer import Grid, GroupRanges
from .report import BlockReport

log = logging.getLogger(__name__)


class LearnerOptions(BaseModel):
    """Options every learner has; a learner's own options subclass this. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(20, ge=0, description="passes over the block's calibration batches (OmniQuant: 20 at W3-W4, 40 at W2)")
    lr: float = Field(1e-2, gt=0, description="learning rate (of the learned clipping, where there is one: "
                                             "OmniQuant's LWC uses 1e-2)")
    lookahead: int = Field(0, ge=0, description="cross-layer learning: following full-precision blocks the loss looks "
                                                "through (0: off; CQE+ is 1)")
    lambda_cl: float = Field(1.0, ge=0, description="weight of each look-ahead term of the loss")

    @model_validator(mode="after")
    def _lambda_needs_lookahead(self) -> LearnerOptions:
        if "lambda_cl" in self.model_fields_set and self.lookahead == 0:
            raise ValueError("lambda_cl weighs the cross-layer loss, which is off with lookahead 0; set lookahead to 1 "
                             "or more, or drop lambda_cl")
        return self


@dataclass(frozen=True)
class BlockTask:
    """Everything a learner sees of one block. The tensors are read-only; ``inputs``, ``targets``
    and ``following_targets`` hold one tensor per calibration batch, ``kwargs`` the keyword
    arguments (masks, positions) the model passes its blocks for that batch."""

    name: str
    """The block's path in the model (``model.layers.3``), for messages and progress."""
    block: nn.Module
    linears: Mapping[str, nn.Linear]
    """The linears to be quantized, by path inside the block, in the adapter's order."""
    inputs: Sequence[Tensor]
    """X_q: the block's inputs on the quantized path (the outputs of the blocks quantized before it)."""
    kwargs: Sequence[dict[str, Any]]
    targets: Sequence[Tensor]
    """Y = F(X_fp): the full-precision block's outputs on the full-precision model's inputs."""
    following: Sequence[nn.Module]
    """The next ``lookahead`` blocks in full precision (fewer at the end of the model); do not change them."""
    following_targets: Sequence[Sequence[Tensor]]
    """``following_targets[k]``: the full-precision outputs of ``following[k]``."""
    following_kwargs: Sequence[Sequence[dict[str, Any]]]
    """``following_kwargs[k]``: the keyword arguments the model passes ``following[k]``, per batch (they
    differ between blocks of different kinds, e.g. Gemma 3's sliding-window and global layers)."""
    grid: Grid
    seed: int
    """Seeds whatever the learner draws (the order of the batches): the same task learns the same."""


@dataclass(frozen=True)
class LearnedBlock:
    """What a learner leaves besides the block's new dense weights: the learned ``ranges`` of the
    linears it clipped (by path inside the block; a linear without one gets its grid from its own
    weights), and the mean loss of each epoch."""

    ranges: dict[str, GroupRanges]
    losses: list[float]


class Learner(ABC):
    """Learns a block's weights (and grid ranges) so that the quantized block reproduces the
    full-precision one; see the module docstring. Subclass `GradientLearner` for the usual frame,
    or this class to train otherwise."""

    #: The learner's option model; ``options(values)`` validates what a config gives.
    Options: ClassVar[type[LearnerOptions]] = LearnerOptions

    def options(self, values: dict[str, Any] | None = None) -> LearnerOptions:
        return self.Options(**(values or {}))

    def learns_ranges(self, options: LearnerOptions) -> bool:
        """Whether `learn` returns grid ranges with these options (then ``grid.clip`` is refused, it
        would search what the learner learns, and groups keep their original column order)."""
        return False

    @abstractmethod
    def learn(self, task: BlockTask, options: LearnerOptions) -> LearnedBlock:
        """Train on ``task``, write the learned dense weights into ``task.linears`` and return the
        learned ranges. Runs with gradients enabled, outside inference mode."""


class LinearParametrization(nn.Module):
    """One linear's weight as a differentiable function of trainable tensors (this module's
    parameters): `weight` is the dense weight, `ranges` the interval its grids cover."""

    @abstractmethod
    def weight(self) -> Tensor:
        """The dense weight W(θ), (out, in)."""

    def ranges(self, weight: Tensor) -> GroupRanges | None:
        """The learned interval of every row and group of ``weight``; None: the weight's own min/max."""
        return None

    def penalty(self) -> Tensor | None:
        """A term added to the loss (a regulariser on the parameters), or None."""
        return None

    def param_groups(self, options: LearnerOptions) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (each with its own ``lr``)."""
        return [{"params": list(self.parameters()), "lr": options.lr}]


class GradientLearner(Learner):
    """The frame of learners that train per-linear parametrizations by gradient descent on the
    block's reconstruction loss (the module docstring): implement `parametrize`; override
    `optimizer` for another update rule (signed gradient descent, say)."""

    @abstractmethod
    def parametrize(self, linear: nn.Linear, grid: Grid, options: LearnerOptions) -> LinearParametrization:
        """The trainable form of ``linear``'s weight, initialised at (or near) the weight itself."""

    def optimizer(self, parametrizations: Sequence[LinearParametrization], options: LearnerOptions) -> torch.optim.Optimizer:
        """AdamW without weight decay over every parametrization's groups (OmniQuant's choice)."""
        groups = [group for p in parametrizations for group in p.param_groups(options) if group["params"]]
        return torch.optim.AdamW(groups, weight_decay=0.0)

    def learn(self, task: BlockTask, options: LearnerOptions) -> LearnedBlock:
        parametrizations = {name: self.parametrize(linear, task.grid, options) for name, linear in task.linears.items()}
        optimizer = self.optimizer(list(parametrizations.values()), options) if options.epochs else None
        return train_block(task, parametrizations, optimizer, options)


class _RoundSTE(torch.autograd.Function):
    """``round`` forward (bit for bit torch.round), identity backward: the straight-through estimator."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def fake_quantize(weight: Tensor, grid: Grid, ranges: GroupRanges | None = None) -> Tensor:
    """``weight`` on ``grid`` with the intervals ``ranges`` (default: each group's own min/max),
    rounding straight through. The forward is exactly what round-to-nearest on those ranges gives
    (the same scale, zero and codes, `compquant.core.quantizer`), so a block trained on it is the
    block RTN then produces."""
    ranges = ranges if ranges is not None else grid.group_ranges(weight)
    params = grid.params_from_range(ranges.lo, ranges.hi)
    index = grid.group_index(weight.shape[1], weight.device)
    scale, zero = params.scale[:, index], params.zero[:, index]
    low, high = grid.code_range
    return scale * (torch.clamp(_RoundSTE.apply(weight / scale) + zero, low, high) - zero)


def train_block(
    task: BlockTask,
    parametrizations: Mapping[str, LinearParametrization],
    optimizer: torch.optim.Optimizer | None,
    options: LearnerOptions,
) -> LearnedBlock:
    """The frame of `GradientLearner`: ``options.epochs`` passes over the batches in a seeded order,
    one optimizer step per batch, then each parametrization folded into its linear. Progress names
    the block, the epochs done and the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(task.seed)
    fixed = frozen_tensors(task.block, skip={f"{name}.weight" for name in parametrizations})
    following = [(block, frozen_tensors(block)) for block in task.following]
    losses: list[float] = []
    for _ in progress(range(options.epochs), desc=f"{task.name} epochs", total=options.epochs,
                      status=lambda: f"loss {losses[-1]:.4g}"):
        total = 0.0
        order = torch.randperm(len(task.inputs), generator=generator).tolist()
        for batch in order:
            weights = {f"{name}.weight": fake_quantize(w := p.weight(), task.grid, p.ranges(w))
                       for name, p in parametrizations.items()}
            loss = reconstruction_loss(task, {**fixed, **weights}, following, batch, options.lambda_cl)
            for p in parametrizations.values():
                if (penalty := p.penalty()) is not None:
                    loss = loss + penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total / len(order))
    ranges = {}
    with torch.inference_mode():  # the block's own tensors may be inference tensors (low-memory mode)
        for name, p in parametrizations.items():
            weight = p.weight()
            learned = p.ranges(weight)
            task.linears[name].weight.copy_(weight)
            if learned is not None:
                ranges[name] = GroupRanges(learned.lo.detach().clone(), learned.hi.detach().clone())
    return LearnedBlock(ranges, losses)


def reconstruction_loss(
    task: BlockTask,
    tensors: Mapping[str, Tensor],
    following: Sequence[tuple[nn.Module, Mapping[str, Tensor]]],
    batch: int,
    lambda_cl: float,
) -> Tensor:
    """``‖F(X_q; tensors) − Y‖²`` (mean) on one batch, plus ``lambda_cl · ‖F_k(…) − Y_k‖²`` through
    each following block (cross-layer learning, docs/learners.md §4)."""
    kwargs = trainable(task.kwargs[batch])
    output = hidden_states(functional_call(task.block, dict(tensors), (trainable(task.inputs[batch]),), kwargs))
    loss = F.mse_loss(output, trainable(task.targets[batch]))
    for (block, block_tensors), targets, block_kwargs in zip(following, task.following_targets, task.following_kwargs):
        output = hidden_states(functional_call(block, dict(block_tensors), (output,), trainable(block_kwargs[batch])))
        loss = loss + lambda_cl * F.mse_loss(output, trainable(targets[batch]))
    return loss


def frozen_tensors(module: nn.Module, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, Tensor]:
    """Every parameter and buffer of ``module`` as a constant of the learner's graph: detached (no
    gradient is computed for it), or copied where it is an inference tensor (autograd cannot keep those)."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return {name: trainable(tensor).detach() for name, tensor in named if name not in skip}


def trainable(value: Any) -> Any:
    """``value`` with every inference tensor in it (the calibration loop's activations) copied into
    a tensor autograd can use; other values as they are."""
    if isinstance(value, Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, tuple):
        return tuple(trainable(item) for item in value)
    if isinstance(value, list):
        return [trainable(item) for item in value]
    if isinstance(value, dict):
        return {key: trainable(item) for key, item in value.items()}
    return value


# --------------------------------------------------------------------------- in the calibration loop
class BlockSource(Protocol):
    """What the loop's block store lends a learner: a block in full precision, on the compute
    device, for the duration of a ``with`` (`compquant.core.block_store`)."""

    def borrow(self, prefix: str, block: nn.Module) -> contextlib.AbstractContextManager[None]: ...


@dataclass(frozen=True)
class BlockLearning:
    """A learner as the calibration loop runs it: which one, with what options, seeded by the run."""

    name: str
    learner: Learner
    options: LearnerOptions
    seed: int = 0

    @property
    def learns_ranges(self) -> bool:
        return self.learner.learns_ranges(self.options)

    def run(
        self,
        index: int,
        blocks: Sequence[nn.Module],
        adapter: ArchitectureAdapter,
        hidden: Sequence[Tensor],
        block_kwargs: Sequence[Sequence[dict[str, Any]]],
        fp_hidden: Sequence[Tensor],
        grid: Grid,
        store: BlockSource,
    ) -> tuple[LearnedBlock, list[Tensor], BlockReport]:
        """Learn block ``index`` (its full-precision weights still in place) from ``hidden`` (X_q)
        towards the full-precision outputs on ``fp_hidden``, borrowing the look-ahead blocks from
        ``store``. Returns what was learned, the block's full-precision outputs (the next block's
        full-precision inputs) and the block's report."""
        started = time.perf_counter()
        block, kwargs = blocks[index], block_kwargs[index]
        targets = run_block(block, fp_hidden, kwargs)
        ahead = range(index + 1, min(index + 1 + self.options.lookahead, len(blocks)))
        with contextlib.ExitStack() as borrowed:
            following_targets, previous = [], targets
            for later in ahead:
                borrowed.enter_context(store.borrow(f"{adapter.blocks}.{later}", blocks[later]))
                previous = run_block(blocks[later], previous, block_kwargs[later])
                following_targets.append(previous)
            linears = {name: block.get_submodule(name) for name in adapter.linears()}
            task = BlockTask(f"{adapter.blocks}.{index}", block, linears, hidden, kwargs, targets,
                             [blocks[later] for later in ahead], following_targets,
                             [block_kwargs[later] for later in ahead], grid, (self.seed << 20) + index)
            with torch.inference_mode(False), torch.enable_grad():
                learned = self.learner.learn(task, self.options)
        seconds = time.perf_counter() - started
        if learned.losses:
            log.info("%s %s: loss %.4g after epoch 1, %.4g after epoch %d (%.1f s)", self.name, task.name,
                     learned.losses[0], learned.losses[-1], len(learned.losses), seconds)
        return learned, targets, BlockReport(task.name, self.name, learned.losses, seconds)

