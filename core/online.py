"""Operations that must run on a linear's input at inference time, attached by transforms.

An input operation is an ``nn.Module`` mapping the input tensor to the tensor the linear should see.
It becomes a submodule of the linear (so its buffers travel with the model's state dict) and runs
as a forward pre-hook, so calibration statistics, evaluation and the saved model all see the
transformed input.
"""
from __future__ import annotations

from torch import Tensor, nn

ATTRIBUTE = "compquant_input_ops"


def attach_input_op(linear: nn.Module, op: nn.Module) -> None:
    """Run ``op`` on every input of ``linear`` before ``linear`` itself, after earlier ops."""
    if not hasattr(linear, ATTRIBUTE):
        linear.add_module(ATTRIBUTE, nn.Sequential())
        linear.register_forward_pre_hook(_apply_input_ops)
    getattr(linear, ATTRIBUTE).append(op)


def input_ops(linear: nn.Module) -> list[nn.Module]:
    """The operations attached to ``linear``, in the order they run."""
    return list(getattr(linear, ATTRIBUTE, ()))


def _apply_input_ops(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (getattr(module, ATTRIBUTE)(args[0]), *args[1:])
