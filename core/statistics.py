"""Calibration statistics of one group of linears that read the same input.

In the notation of docs/methods.md §0: X are the inputs the partly quantized model feeds the layer,
X̃ the full-precision model's inputs for the same tokens. A solver asks for the statistics it needs
(`Solver.statistics`); each is a `Statistic` that makes its own `Accumulator`, so a solver can bring
one the core does not know. Two are built in:

* `Statistic.HESSIAN`: ``H = 2/N · X Xᵀ`` (GPTQ and everything built on it);
* `Statistic.CROSS`: ``dXXT = 2/N · (X̃ − X) Xᵀ`` (GPTAQ, GPTAQ-based ResComp).

Asking for a statistic that needs X̃ (the cross term does) makes the calibration loop keep a
full-precision stream beside the quantized one. N counts tokens; the scale cancels in every update.
Accumulation is a running mean, so the sums never grow with the number of tokens.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor


class NonFiniteStatisticsError(ArithmeticError):
    """NaN or Inf reached the statistics: the model or the data produced them."""


class Accumulator(ABC):
    """The running state of one statistic over the calibration batches of one layer input.

    The state is a few tensors and ``tokens``, the number of tokens added so far, so that the states
    of several processes can later be combined into one (a token-weighted mean for the built-ins).
    """

    tokens: int

    @abstractmethod
    def add(self, inputs: Tensor, fp_inputs: Tensor | None) -> None:
        """Add a batch: ``inputs`` X and ``fp_inputs`` X̃ (None unless the statistic needs them),
        each (tokens, columns) in the accumulator's dtype."""

    @abstractmethod
    def result(self) -> Tensor:
        """The statistic over every token added."""

    def means(self) -> Sequence[Tensor] | None:
        """The state's tensors, when each is a mean over the ``tokens`` added: a run on several
        ranks then combines the ranks' states in place into their token-weighted mean before the
        solve (`compquant.core.distributed`). None (the default) says the state is something else;
        such an accumulator runs on one process only."""
        return None


class Statistic(ABC):
    """A statistic a solver can ask the calibration loop for.

    ``name`` is how `LayerStatistics` and messages call it, ``formula`` how errors write it;
    ``needs_fp_inputs`` says that its accumulator wants X̃ beside X. Statistics are compared by
    identity: make one instance, return it from `Solver.statistics` and read the finished tensor as
    ``stats[statistic]``.
    """

    HESSIAN: ClassVar[Statistic]
    CROSS: ClassVar[Statistic]

    def __init__(self, name: str, *, needs_fp_inputs: bool = False, formula: str | None = None) -> None:
        self.name = name
        self.needs_fp_inputs = needs_fp_inputs
        self.formula = formula or name

    def __repr__(self) -> str:
        return f"<Statistic {self.name}>"

    @abstractmethod
    def accumulator(self, columns: int, *, dtype: torch.dtype, device: torch.device | str) -> Accumulator:
        """A fresh accumulator for inputs of width ``columns``, holding its state in ``dtype`` on ``device``."""


class SecondMoment(Statistic):
    """``2/N · A Xᵀ`` over N tokens, with ``A = left(X, X̃)`` (each columns × tokens, as in
    docs/methods.md §0): the shape of both built-in statistics, and of any other second moment."""

    def __init__(
        self, name: str, left: Callable[[Tensor, Tensor | None], Tensor], *, needs_fp_inputs: bool = False, formula: str
    ) -> None:
        super().__init__(name, needs_fp_inputs=needs_fp_inputs, formula=formula)
        self.left = left

    def accumulator(self, columns: int, *, dtype: torch.dtype, device: torch.device | str) -> Accumulator:
        return RunningSecondMoment(columns, self.left, dtype=dtype, device=device)


class RunningSecondMoment(Accumulator):
    """The running mean of a `SecondMoment`: after N tokens, ``value = 2/N · A Xᵀ``."""

    def __init__(
        self, columns: int, left: Callable[[Tensor, Tensor | None], Tensor], *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.left = left
        self.value = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, inputs: Tensor, fp_inputs: Tensor | None) -> None:
        total = self.tokens + inputs.shape[0]
        self.value.mul_(self.tokens / total).addmm_(self.left(inputs, fp_inputs).T, inputs, alpha=2.0 / total)
        self.tokens = total

    def result(self) -> Tensor:
        return self.value

    def means(self) -> Sequence[Tensor]:
        return (self.value,)


Statistic.HESSIAN = SecondMoment("hessian", lambda x, fp: x, formula="H = XXᵀ")
Statistic.CROSS = SecondMoment("cross", lambda x, fp: fp - x, needs_fp_inputs=True, formula="dXXT")


def needs_fp_inputs(statistics: Iterable[Statistic]) -> bool:
    """Whether collecting ``statistics`` takes the full-precision inputs X̃."""
    return any(statistic.needs_fp_inputs for statistic in statistics)


@dataclass(frozen=True)
class LayerStatistics:
    """What a solver sees of its calibration data: ``stats[statistic]`` for any statistic it asked
    for, ``hessian`` and ``cross`` for the built-ins (None when not asked for). Treat the tensors as
    read-only: the linears of one group share them."""

    hessian: Tensor | None
    cross: Tensor | None
    tokens: int
    others: Mapping[Statistic, Tensor] = field(default_factory=dict)
    """The statistics other than the built-ins."""

    @classmethod
    def collected(cls, values: Mapping[Statistic, Tensor], tokens: int) -> LayerStatistics:
        built_in = (Statistic.HESSIAN, Statistic.CROSS)
        others = {statistic: value for statistic, value in values.items() if statistic not in built_in}
        return cls(values.get(Statistic.HESSIAN), values.get(Statistic.CROSS), tokens, others)

    def __getitem__(self, statistic: Statistic) -> Tensor:
        if statistic is Statistic.HESSIAN:
            value = self.hessian
        elif statistic is Statistic.CROSS:
            value = self.cross
        else:
            value = self.others.get(statistic)
        if value is None:
            raise KeyError(f"the statistic {statistic.name!r} was not collected; the solver's statistics() must ask for it")
        return value


class StatisticsAccumulator:
    """The ``wanted`` statistics over batches of inputs of width ``columns``, accumulated in ``dtype``."""

    def __init__(
        self,
        columns: int,
        wanted: frozenset[Statistic],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.wanted = wanted
        self.dtype = dtype
        self.tokens = 0
        built_in_first = sorted(wanted, key=lambda s: (s is not Statistic.HESSIAN, s is not Statistic.CROSS, s.name))
        self.accumulators = {s: s.accumulator(columns, dtype=dtype, device=device) for s in built_in_first}
        self.needs_fp_inputs = needs_fp_inputs(wanted)

    def add(self, inputs: Tensor, fp_inputs: Tensor | None = None) -> None:
        """Add a batch; ``inputs`` and ``fp_inputs`` are (..., columns) for the same tokens."""
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.dtype)
        fp = None
        if self.needs_fp_inputs:
            if fp_inputs is None:
                names = ", ".join(sorted(s.formula for s in self.wanted if s.needs_fp_inputs))
                raise ValueError(f"{names} needs the full-precision inputs X̃; pass fp_inputs")
            fp = fp_inputs.reshape(-1, fp_inputs.shape[-1]).to(self.dtype)
        for statistic, accumulator in self.accumulators.items():
            accumulator.add(x, fp if statistic.needs_fp_inputs else None)
        self.tokens += x.shape[0]

    def result(self) -> LayerStatistics:
        if self.tokens == 0:
            raise ValueError("no calibration inputs were accumulated")
        values = {statistic: accumulator.result() for statistic, accumulator in self.accumulators.items()}
        for statistic, tensor in values.items():  # H first: X itself is where NaN usually comes from
            if not torch.isfinite(tensor).all():
                raise NonFiniteStatisticsError(f"{statistic.formula} holds NaN or Inf values")
        return LayerStatistics.collected(values, self.tokens)
