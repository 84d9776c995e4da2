"""A module's forward pass that stops part way and is resumed later: the one-pass calibration loop
of docs/methods.md §4 runs each calibration batch through a block this way, stopped in front of
every group of linears until that group is quantized.

The forward runs in a greenlet of its own: a call stack that can be held half way and switched to
and from within the calling thread (Python holds a half-run call stack only in a thread, a
greenlet, or a generator, which the block's code is not). A forward pre-hook on each *stop* module
hands the module's inputs to the caller and switches back to it. The caller and the forward take
turns strictly, so exactly one of them computes at any time and torch's intra-op threads are never
oversubscribed, however many forwards are paused. Being one thread also means one heap: threads
would each keep their own allocator arena of freed temporaries (several times the loop's memory).
Nothing is traced: the module runs its own code (transformers', timm's), hooks and online ops
included. The forward shares the caller's thread state (grad and inference modes): the block's code
must not leave such a mode switched at a stop, which no layer's forward does.

A forward that will not be resumed is unwound by `close` (a `BaseException` raised at its stop, so
no ``except Exception`` in the model's code swallows it); an exception raised inside the forward
reaches the caller from `advance` with its message and traceback. A `PausedForward` is a context
manager that closes itself.
"""
from __future__ import annotations

import contextvars
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import greenlet
from torch import nn


class _Cancelled(BaseException):
    """Raised at a stop to unwind a forward that will not be resumed."""


@dataclass(frozen=True)
class Stop:
    """Where a paused forward waits: the ``key`` its stop module was given, the module, the
    positional arguments the module is about to receive (after any earlier pre-hooks, such as an
    online op, have run), and a copy of the forward's context variables there (what the model's code
    set for this call, such as the routing mask of `compquant.core.routing`)."""

    key: Hashable
    module: nn.Module
    args: tuple[Any, ...]
    context: contextvars.Context


@dataclass(frozen=True)
class _Returned:
    output: Any


class PausedForward:
    """``module(*args, **kwargs)``, stopped just before the first call of any module in ``stops``
    with a key it has not stopped at yet (so once per key: a group of linears sharing a key stops
    the forward once, at whichever of them runs first). Nothing runs until the first `advance`;
    the forward sees the creating caller's context variables."""

    def __init__(self, module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                 stops: Mapping[nn.Module, Hashable]) -> None:
        self.output: Any = None
        self.finished = False
        self._stops = stops
        self._passed: set[Hashable] = set()
        self._call = (module, args, dict(kwargs))
        self._forward = greenlet.greenlet(self._run)
        self._forward.gr_context = contextvars.copy_context()
        self._handles = [stop.register_forward_pre_hook(self._stop) for stop in dict.fromkeys(stops)]

    def __enter__(self) -> PausedForward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def advance(self) -> Stop | None:
        """Let the forward run to its next stop and return it, or None once the module has returned
        (its result is then in ``output``). An exception the forward raised is raised here."""
        if self.finished:
            raise RuntimeError("this forward has already returned or failed; it cannot be advanced")
        event = self._forward.switch()
        if isinstance(event, Stop):
            return event
        self.finished = True
        self._end()
        if isinstance(event, BaseException):
            raise event
        self.output = event.output
        return None

    def close(self) -> None:
        """Unwind the forward where it stopped (its ``finally`` blocks run); one that never started
        is dropped."""
        self.finished = True
        if self._forward:  # a greenlet is true while it has started and not ended
            self._forward.throw(_Cancelled)
        self._end()

    def _end(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._call = None

    def _run(self) -> _Returned | BaseException | None:
        module, args, kwargs = self._call
        try:
            return _Returned(module(*args, **kwargs))
        except _Cancelled:
            return None
        except BaseException as error:  # the caller re-raises it; nothing is lost by catching it here
            return error

    def _stop(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """The pre-hook: stop here if this is the forward's own greenlet and the key is new."""
        if greenlet.getcurrent() is not self._forward or self._stops[module] in self._passed:
            return
        self._passed.add(self._stops[module])
        self._forward.parent.switch(Stop(self._stops[module], module, args, contextvars.copy_context()))
