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

A saved description names each op by the name its type was registered under (plugins register op
types through ``compquant_register_online_ops``, as they register solvers) and gives its options.
Loading builds ops only from those registered types, with options validated by the type's own
pydantic model against the site they are attached to: nothing named in a file is ever imported,
so a checkpoint folder cannot make compquant run code.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from .errors import ModelLoadError
from .options import describe_validation_error

if TYPE_CHECKING:
    from .registry import PluginRegistry

Site = Literal["input", "query", "key"]
SITES: tuple[Site, ...] = ("input", "query", "key")


class OnlineOpOptions(BaseModel):
    """Base for an online op's options, what rebuilds it after loading; unknown keys are errors.
    Validators may read the width of the tensors the op will see at its site from the validation
    context (``info.context["width"]``), so that a file cannot ask for an op that does not fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OnlineOp(nn.Module):
    """Base of every online operation. A type whose ops must survive a save and load is registered
    by a plugin (``compquant_register_online_ops``), has an `Options` model, returns its options
    from `options` and is rebuilt by `from_options`."""

    Options: ClassVar[type[OnlineOpOptions]] = OnlineOpOptions

    def options(self) -> OnlineOpOptions:
        """The options that rebuild this op (see `from_options`)."""
        raise NotImplementedError(f"{type(self).__name__} must say how to rebuild it (options)")

    @classmethod
    def from_options(cls, options: OnlineOpOptions) -> OnlineOp:
        """The op with these (validated) options; by default the options are the constructor's arguments."""
        return cls(**dict(options))


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


def describe_online_ops(model: nn.Module, registry: PluginRegistry) -> dict[str, list[dict[str, Any]]]:
    """{module path: [{"site": ..., "op": registered name, "options": {...}}, ...]} for every attached op;
    an op whose type no plugin registered is an error (it could not be rebuilt after loading)."""
    description = {}
    for name, module in model.named_modules():
        specs = [
            {"site": site, "op": registry.name_of("online_op", type(op)), "options": op.options().model_dump(mode="json")}
            for site in SITES
            for op in online_ops(module, site)
        ]
        if specs:
            description[name] = specs
    return description


def restore_online_ops(model: nn.Module, description: Any, registry: PluginRegistry, source: str = "the description") -> None:
    """Re-attach the ops `describe_online_ops` recorded (read from ``source``, named in errors).
    Every op is built from a registered type with validated options; nothing is imported."""
    if not isinstance(description, dict):
        raise ModelLoadError(f"{source} must map module paths to lists of ops, found {type(description).__name__}")
    for path, specs in description.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ModelLoadError(f"{source} attaches online ops to {path!r}, which this model does not have") from None
        for spec in specs if isinstance(specs, list) else [specs]:
            site, op = _build(model, module, path, spec, registry, source)
            if site == "input":
                attach_input_op(module, op)
            else:
                attach_attention_op(model, module, op, site)


def _build(model: nn.Module, module: nn.Module, path: str, spec: Any, registry: PluginRegistry,
           source: str) -> tuple[Site, OnlineOp]:
    """One recorded op: its site and the op, from its registered type and validated options."""
    where = f"{source}, {path}"
    if not isinstance(spec, dict):
        raise ModelLoadError(f"{where}: an op must be a mapping with site, op and options, found {spec!r}")
    site = spec.get("site", "input")
    if site not in SITES:
        raise ModelLoadError(f"{where}: unknown site {site!r}; ops run at {', '.join(SITES)}")
    cls = _op_type(spec, registry, where)
    width = _site_width(model, module, site)
    if width is None:
        raise ModelLoadError(f"{where}: {type(module).__name__} has no {site} site of known width to attach an op to")
    try:
        options = cls.Options.model_validate(spec.get("options", spec.get("kwargs", {})), context={"width": width})
    except ValidationError as error:
        raise ModelLoadError(f"{where}: {describe_validation_error(error, f'online op {cls.__name__}', cls.Options)}") from None
    return site, cls.from_options(options)


def _op_type(spec: dict[str, Any], registry: PluginRegistry, where: str) -> type[OnlineOp]:
    """The registered type a spec names: by registered name, or (files written before the registry)
    by the ``module:Class`` string of a registered type, compared as text, never imported."""
    table = registry.table("online_op")
    if "op" in spec and spec["op"] in table:
        return table[spec["op"]].obj
    legacy = {f"{entry.obj.__module__}:{entry.obj.__qualname__}": entry.obj for entry in table.values()}
    if "op" not in spec and spec.get("class") in legacy:
        return legacy[spec["class"]]
    named = spec.get("op", spec.get("class"))
    raise ModelLoadError(f"{where}: {named!r} is not an online op type any installed plugin registers (registered: "
                         f"{', '.join(sorted(table)) or 'none'}); nothing named in a checkpoint is imported. Install the "
                         "plugin that provides it, or remove the entry if you do not trust the file")


def _site_width(model: nn.Module, module: nn.Module, site: Site) -> int | None:
    """The size of the last dimension an op at ``site`` of ``module`` transforms."""
    if site == "input":
        return getattr(module, "in_features", None)
    config = getattr(model, "config", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and config is not None and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    return head_dim


def _apply_input_ops(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (_container(module, "input")(args[0]), *args[1:])
