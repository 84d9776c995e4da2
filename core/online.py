"""Operations that must run at inference time, attached by transforms.

An online operation is an `OnlineOp`: an ``nn.Module`` mapping a tensor to the tensor the model
should use instead, rebuildable from a small JSON description. It runs at one of three sites:

- ``input``: the input of a linear (a forward pre-hook), e.g. QuaRot's R4 in front of ``down_proj``;
- ``query`` / ``key``: an attention module's query / key states after the rotary embedding, e.g.
  QuaRot's R3. These go through compressed-tensors' hooked attention, which runs the key op before
  the KV cache stores the keys, so a cache quantizer sees the transformed keys.

The op becomes a submodule of the module it is attached to, so calibration statistics, evaluation
and the saved model all see it. `describe_online_ops` and `restore_online_ops` carry them through a
save and load.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Literal

from torch import Tensor, nn

Site = Literal["input", "query", "key"]
SITES: tuple[Site, ...] = ("input", "query", "key")


class OnlineOp(nn.Module):
    """Base of every online operation. Subclasses take JSON-serialisable keyword arguments and return
    them from `init_kwargs`, so the op can be rebuilt after loading."""

    def init_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must say how to rebuild it (init_kwargs)")


def _container_name(site: Site) -> str:
    return f"compquant_{site}_ops"


def _container(module: nn.Module, site: Site) -> nn.Sequential | None:
    return getattr(module, _container_name(site), None)


def _check(op: nn.Module) -> None:
    if not isinstance(op, OnlineOp):
        raise TypeError(f"online ops must subclass compquant.core.online.OnlineOp, got {type(op).__name__}")


def attach_input_op(linear: nn.Module, op: OnlineOp) -> None:
    """Run ``op`` on every input of ``linear`` before ``linear`` itself, after earlier ops."""
    _check(op)
    if _container(linear, "input") is None:
        linear.add_module(_container_name("input"), nn.Sequential())
        linear.register_forward_pre_hook(_apply_input_ops)
    _container(linear, "input").append(op)


def attach_attention_op(model: nn.Module, attention: nn.Module, op: OnlineOp, site: Literal["query", "key"]) -> None:
    """Run ``op`` on ``attention``'s post-RoPE query or key states (``site``), after earlier ops.

    ``model`` is the transformers model that owns ``attention``: its attention implementation is
    switched to compressed-tensors' hooked one, which calls the original implementation. The switch
    is model-wide, so every attention module of the same class is prepared for it.
    """
    from compressed_tensors.modeling import IMPL_ATTR, KV_CACHE_ATTR, initialize_hooked_attention

    # site: (the hooked submodule compressed-tensors adds to the attention, its argument holding the states)
    hooked_argument = {"query": (IMPL_ATTR, "query"), "key": (KV_CACHE_ATTR, "key_states")}
    _check(op)
    if site not in hooked_argument:
        raise ValueError(f"attention ops run on 'query' or 'key' states, not {site!r}")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"query/key ops need a transformers model (one with set_attn_implementation), got {type(model).__name__}")
    if _container(attention, site) is None:
        for module in model.modules():
            if type(module) is type(attention):
                initialize_hooked_attention(model, module)
        hooked, argument = hooked_argument[site]
        ops = _StateOps(argument)
        attention.add_module(_container_name(site), ops)
        getattr(attention, hooked).register_forward_pre_hook(ops.replace_states, with_kwargs=True)
        if site == "key":
            attention.register_forward_pre_hook(_route_cache_through_hooked_cache, with_kwargs=True)
    _container(attention, site).append(op)


#: The names transformers has given the attention forward's KV-cache argument, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def _route_cache_through_hooked_cache(attention: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of an attention module with a key site: hand it compressed-tensors' hooked
    KV cache under the argument name its forward really takes, wrapping the model's own cache.

    compressed-tensors 0.20.1 passes its hooked cache as ``past_key_values`` or ``past_key_value``;
    transformers 5.24 renamed the argument ``cache``, so the hooked cache went unused, the key op
    never ran and R3 silently turned queries only. This hook works with every name: it takes the
    model's cache from whichever alias carries it, drops the aliases, and passes the hooked cache
    under the forward's own name.
    """
    from compressed_tensors.modeling import KV_CACHE_ATTR

    hooked = getattr(attention, KV_CACHE_ATTR)
    accepted = inspect.signature(attention.forward).parameters
    name = next((candidate for candidate in CACHE_ARGUMENTS if candidate in accepted), None)
    if name is None:
        raise TypeError(f"{type(attention).__name__}.forward takes none of {CACHE_ARGUMENTS}; a key op cannot reach its "
                        "KV cache. This transformers version is not supported: see the versions the README names")
    if len(args) > list(accepted).index(name):
        raise TypeError(f"{type(attention).__name__} received its KV cache by position; key ops need it by name")
    given = [kwargs.pop(alias) for alias in CACHE_ARGUMENTS if alias in kwargs]
    caches = [value for value in given if value is not None and value is not hooked]
    if caches:
        hooked.add_past_key_values(caches[0])
    elif not any(value is hooked for value in given):  # else compressed-tensors already wrapped the cache
        hooked.add_past_key_values(None)
    kwargs[name] = hooked
    return args, kwargs


class _StateOps(nn.Sequential):
    """The ops of one query or key site. Its hook is a method of this module, not a closure, so a
    deep copy of the model runs the copy's ops (a closure would keep calling the original's)."""

    def __init__(self, argument: str) -> None:
        super().__init__()
        self.argument = argument

    def replace_states(self, hooked: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of compressed-tensors' hooked attention or KV cache: transform the
        query or key states it is about to use."""
        bound = inspect.signature(hooked.forward).bind(*args, **kwargs)
        bound.arguments[self.argument] = self(bound.arguments[self.argument])
        return bound.args, bound.kwargs


def online_ops(module: nn.Module, site: Site = "input") -> list[nn.Module]:
    """The operations attached to ``module`` at ``site``, in the order they run."""
    return list(_container(module, site) or ())


def describe_online_ops(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """{module path: [{"site": ..., "class": "module:Class", "kwargs": {...}}, ...]} for every attached op."""
    description = {}
    for name, module in model.named_modules():
        specs = [
            {"site": site, "class": f"{type(op).__module__}:{type(op).__qualname__}", "kwargs": op.init_kwargs()}
            for site in SITES
            for op in online_ops(module, site)
        ]
        if specs:
            description[name] = specs
    return description


def restore_online_ops(model: nn.Module, description: dict[str, list[dict[str, Any]]]) -> None:
    """Re-attach the ops `describe_online_ops` recorded. Only `OnlineOp` subclasses are built."""
    for name, specs in description.items():
        module = model.get_submodule(name)
        for spec in specs:
            module_name, _, class_name = spec["class"].partition(":")
            cls = getattr(importlib.import_module(module_name), class_name, None)
            if not (isinstance(cls, type) and issubclass(cls, OnlineOp)):
                raise TypeError(f"{spec['class']} recorded for {name} is not a compquant OnlineOp; refusing to build it")
            site = spec.get("site", "input")
            if site == "input":
                attach_input_op(module, cls(**spec["kwargs"]))
            else:
                attach_attention_op(model, module, cls(**spec["kwargs"]), site)


def _apply_input_ops(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (_container(module, "input")(args[0]), *args[1:])
