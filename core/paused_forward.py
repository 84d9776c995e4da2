"""A module's forward pass that stops part way and is resumed later: the one-pass calibration loop
of docs/methods.md §4 runs each calibration batch through a block this way, stopped in front of
every group of linears until that group is quantized.

The forward runs in a thread of its own, because Python can hold a call stack half way only in a
thread (or a generator, which the block's code is not). A forward pre-hook on each *stop* module
hands the module's inputs to the caller and waits there for the word to go on. The caller and the
forward take turns strictly: `PausedForward.advance` lets the forward run and waits until it stops
again, so exactly one thread computes at any time and torch's intra-op threads are never
oversubscribed, however many forwards are paused. Nothing is traced: the module runs its own code
(transformers', timm's), hooks and online ops included.

A forward that will not be resumed is unwound by `close` (a `BaseException` raised at its stop, so
no ``except Exception`` in the model's code swallows it); an exception raised inside the forward
reaches the caller from `advance` with its message and traceback. Either way the thread has ended
when `close` returns, and a `PausedForward` is a context manager that closes itself.
"""
from __future__ import annotations

import contextvars
import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

import torch
from torch import nn

_GO = "go"
_CANCEL = "cancel"


class _Cancelled(BaseException):
    """Raised at a stop to unwind a forward that will not be resumed."""


@dataclass(frozen=True)
class Stop:
    """Where a paused forward waits: the ``key`` its stop module was given, the module, and the
    positional arguments the module is about to receive (after any earlier pre-hooks, such as an
    online op, have run)."""

    key: Hashable
    module: nn.Module
    args: tuple[Any, ...]


@dataclass(frozen=True)
class _Returned:
    output: Any


class PausedForward:
    """``module(*args, **kwargs)``, stopped just before the first call of any module in ``stops``
    with a key it has not stopped at yet (so once per key: a group of linears sharing a key stops
    the forward once, at whichever of them runs first). Nothing runs until the first `advance`.

    The forward inherits the creating thread's context variables and its grad and inference modes
    (torch keeps those per thread)."""

    def __init__(self, module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                 stops: Mapping[nn.Module, Hashable]) -> None:
        self.output: Any = None
        self.finished = False
        self._stops = stops
        self._passed: set[Hashable] = set()
        self._commands: SimpleQueue[str] = SimpleQueue()  # to the forward: _GO or _CANCEL
        self._events: SimpleQueue[Stop | _Returned | BaseException] = SimpleQueue()  # from the forward
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        self._thread = threading.Thread(target=contextvars.copy_context().run,
                                        args=(self._run, module, args, dict(kwargs), modes),
                                        name=f"compquant-forward-{type(module).__name__}", daemon=True)
        self._handles = [stop.register_forward_pre_hook(self._stop) for stop in dict.fromkeys(stops)]
        self._thread.start()

    def __enter__(self) -> PausedForward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def advance(self) -> Stop | None:
        """Let the forward run to its next stop and return it, or None once the module has returned
        (its result is then in ``output``). An exception the forward raised is raised here."""
        if self.finished:
            raise RuntimeError("this forward has already returned or failed; it cannot be advanced")
        self._commands.put(_GO)
        event = self._events.get()
        if isinstance(event, Stop):
            return event
        self.finished = True
        self._end()
        if isinstance(event, BaseException):
            raise event
        self.output = event.output
        return None

    def close(self) -> None:
        """Unwind the forward where it stopped (or before it started) and wait for its thread. When the
        caller was interrupted while the forward ran, the forward unwinds at its next stop, or ends."""
        self.finished = True
        self._commands.put(_CANCEL)
        self._end()

    def _end(self) -> None:
        self._thread.join()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _run(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], modes: tuple[bool, bool]) -> None:
        grad, inference = modes
        try:
            if self._commands.get() == _CANCEL:
                return
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                output = module(*args, **kwargs)
            self._events.put(_Returned(output))
        except _Cancelled:
            pass
        except BaseException as error:  # the caller re-raises it; nothing is lost by catching it here
            self._events.put(error)

    def _stop(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """The pre-hook: stop here if this is the forward's own thread and the key is new."""
        if threading.get_ident() != self._thread.ident or self._stops[module] in self._passed:
            return
        self._passed.add(self._stops[module])
        self._events.put(Stop(self._stops[module], module, args))
        if self._commands.get() == _CANCEL:
            raise _Cancelled
