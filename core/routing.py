"""Linears that see only some of a block's tokens: the projections of a mixture-of-experts expert,
which receive the tokens a router sends them (docs/plugins.md, "Routed linears").

The contract between the module that routes (an adapter's) and the calibration loop is two calls:

* `feeds_every_token()` is True inside the loop's forwards. There a routing module feeds *every*
  token to each routed submodule (an expert), so that the loop can take the statistics of the
  routed tokens and, for a fallback, of all of them; it still adds only the routed tokens' results
  to its output, so the block computes what it always computes. Outside the loop (inference, the
  transforms' checks) it is False and the module routes as usual.
* ``with routed_to(mask):`` around the call of one routed submodule says which of the rows its
  linears receive the router chose (a bool tensor over those rows). The loop reads the mask at each
  stop in front of a group, from the paused forward's own context: every calibration batch runs as
  its own forward, so each sees its own mask, however the forwards interleave.

A group whose linears run under a mask is calibrated on the rows the mask selects, in the quantized
stream; the full-precision inputs X̃ (for GPTAQ and ResComp) are taken at the same rows, so X and
X̃ pair token by token even where the two models' routers disagree. A group that receives fewer
routed tokens than it needs (`RoutedTokens`) is never skipped: it is quantized from every token
of the block as if all were routed to it (``all-tokens``), or by a solver that needs no statistics.

An adapter that unfuses experts a model's class keeps in 3-D tensors puts an `UnfusedExperts` in
their place, so that exporters can tell those linears apart (`unfused_expert_paths`): the formats'
readers fuse them again on load, and may express less for them than for ordinary linears.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

#: ``calibration.expert_fallback`` value for "the statistics of every token, as if routed there".
ALL_TOKENS = "all-tokens"

_EVERY_TOKEN: contextvars.ContextVar[bool] = contextvars.ContextVar("compquant_every_token", default=False)
_ROUTED: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("compquant_routed", default=None)


class UnfusedExperts(nn.ModuleList):
    """Base of the module that stands where a model's own class keeps its experts fused: one
    submodule of ``nn.Linear``s per expert, under the names the family's checkpoints use."""


def unfused_expert_paths(model: nn.Module) -> tuple[str, ...]:
    """The paths of every `UnfusedExperts` module in ``model``."""
    return tuple(name for name, module in model.named_modules() if isinstance(module, UnfusedExperts))


def feeds_every_token() -> bool:
    """Whether a routing module should run each routed submodule on every token (under `routed_to`)."""
    return _EVERY_TOKEN.get()


@contextlib.contextmanager
def routed_to(mask: Tensor) -> Iterator[None]:
    """Run a routed submodule under this: ``mask`` (bool, one entry per row of its input) marks the
    rows its router chose."""
    token = _ROUTED.set(mask)
    try:
        yield
    finally:
        _ROUTED.reset(token)


@contextlib.contextmanager
def every_token() -> Iterator[None]:
    """The calibration loop's side: forwards created inside this context feed every token to routed
    submodules (a `PausedForward` keeps the context it was created in)."""
    token = _EVERY_TOKEN.set(True)
    try:
        yield
    finally:
        _EVERY_TOKEN.reset(token)


def routed_mask(context: contextvars.Context) -> Tensor | None:
    """The mask a routing module set in ``context`` (a paused forward's, at a stop), or None when the
    stop is not inside a routed submodule."""
    return context.get(_ROUTED)


@dataclass(frozen=True)
class RoutedTokens:
    """What a routed group received: ``routed`` calibration tokens; when too few, ``fallback`` names
    what it was quantized from instead (``all-tokens`` or a solver)."""

    routed: int
    fallback: str | None = None
