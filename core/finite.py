"""NaN and Inf checks at the boundaries of a run: the weights it reads, the tensors it writes.

A non-finite value anywhere in a model makes every later number meaningless, and nothing downstream
complains: a checkpoint with NaN in its final norm saves, loads and evaluates to ``perplexity nan``.
So the input model's weights are checked before any work starts, and every tensor is checked
before it is written; the error names the tensors and how many values are bad.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .errors import NonFiniteError


def non_finite(named: Iterable[tuple[str, Tensor]]) -> dict[str, int]:
    """{name: count of NaN/Inf values} for every floating tensor that holds any (meta tensors,
    which hold no values, are skipped)."""
    found = {}
    for name, tensor in named:
        if tensor.is_floating_point() and not tensor.is_meta:
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                found[name] = count
    return found


def describe(found: dict[str, int], most: int = 5) -> str:
    """``a (3 values), b (1 value)`` for the first ``most`` entries, and how many more."""
    shown = [f"{name} ({count} value{'s' if count > 1 else ''})" for name, count in list(found.items())[:most]]
    more = f" and {len(found) - most} more tensors" if len(found) > most else ""
    return ", ".join(shown) + more


def check_input_weights(named: Iterable[tuple[str, Tensor]], source: str) -> None:
    """Refuse a model whose weights hold NaN or Inf, before any work is done on it."""
    found = non_finite(named)
    if found:
        raise NonFiniteError(
            f"the input model {source} holds NaN or Inf in {describe(found)}; nothing was done. Quantizing cannot "
            "repair it: re-download or re-export the checkpoint (compquant eval shows whether the original runs)"
        )


def check_before_writing(named: Iterable[tuple[str, Tensor]], what: str) -> None:
    """Refuse to write tensors that hold NaN or Inf."""
    found = non_finite(named)
    if found:
        raise NonFiniteError(f"refusing to write {what}: NaN or Inf in {describe(found)}; nothing was saved")


def check_metric(name: str, value: float, why: str) -> float:
    """``value`` when it is finite; else a `NonFiniteError` naming the metric and ``why``."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{name} is {value}: {why}")
    return value
