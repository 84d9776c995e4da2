"""Operations that must run on a linear's input at inference time, attached by transforms.

An input operation is an `InputOp`: an ``nn.Module`` mapping the input tensor to the tensor the
linear should see, rebuildable from a small JSON description. It becomes a submodule of the linear
and runs as a forward pre-hook, so calibration statistics, evaluation and the saved model all see the
transformed input. `describe_input_ops` and `restore_input_ops` carry them through a save and load.
"""
from __future__ import annotations

import importlib
from typing import Any

from torch import Tensor, nn

ATTRIBUTE = "compquant_input_ops"


class InputOp(nn.Module):
    """Base of every online input operation. Subclasses take JSON-serialisable keyword arguments
    and return them from `init_kwargs`, so the op can be rebuilt after loading."""

    def init_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must say how to rebuild it (init_kwargs)")


def attach_input_op(linear: nn.Module, op: InputOp) -> None:
    """Run ``op`` on every input of ``linear`` before ``linear`` itself, after earlier ops."""
    if not isinstance(op, InputOp):
        raise TypeError(f"input ops must subclass compquant.core.online.InputOp, got {type(op).__name__}")
    if not hasattr(linear, ATTRIBUTE):
        linear.add_module(ATTRIBUTE, nn.Sequential())
        linear.register_forward_pre_hook(_apply_input_ops)
    getattr(linear, ATTRIBUTE).append(op)


def input_ops(linear: nn.Module) -> list[nn.Module]:
    """The operations attached to ``linear``, in the order they run."""
    return list(getattr(linear, ATTRIBUTE, ()))


def describe_input_ops(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """{linear path: [{"class": "module:Class", "kwargs": {...}}, ...]} for every attached op."""
    return {
        name: [{"class": f"{type(op).__module__}:{type(op).__qualname__}", "kwargs": op.init_kwargs()} for op in ops]
        for name, module in model.named_modules()
        if (ops := input_ops(module))
    }


def restore_input_ops(model: nn.Module, description: dict[str, list[dict[str, Any]]]) -> None:
    """Re-attach the ops `describe_input_ops` recorded. Only `InputOp` subclasses are accepted."""
    for name, ops in description.items():
        linear = model.get_submodule(name)
        for spec in ops:
            module_name, _, class_name = spec["class"].partition(":")
            cls = getattr(importlib.import_module(module_name), class_name, None)
            if not (isinstance(cls, type) and issubclass(cls, InputOp)):
                raise TypeError(f"{spec['class']} recorded for {name} is not a compquant InputOp; refusing to build it")
            attach_input_op(linear, cls(**spec["kwargs"]))


def _apply_input_ops(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (getattr(module, ATTRIBUTE)(args[0]), *args[1:])
