"""Writing a compquant plugin.

A plugin is a module (or any object) with functions marked ``@compquant.hookimpl`` whose names are
hooks from `compquant.core.hookspecs`. To add a solver::

    import compquant

    class MySolver(compquant.Solver):
        def statistics(self, options):
            return frozenset({compquant.Statistic.HESSIAN})

        def solve(self, weight, stats, grid, options):
            ...  # return a compquant.LayerResult

    @compquant.hookimpl
    def compquant_register_solvers(register):
        register("my-solver", MySolver())

and point the entry-point group ``compquant`` at the module in your package's pyproject.toml::

    [project.entry-points.compquant]
    my_solver = "my_package.plugin"

Every kind (solvers, transforms, adapters, exporters, datasets) registers the same way, through
``compquant_register_<kind>s``; the built-ins go through exactly these hooks (their list is handed
in by the package, `compquant.builtins`). A hook name the specs do not know is an error when the
manager is made. Two environment variables control loading: ``COMPQUANT_BLOCK_PLUGINS``
(comma-separated entry-point names not to load) and ``COMPQUANT_TRACE_HOOKS=1`` (log every hook
call at DEBUG level). The guide is docs/plugins.md.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Sequence

import pluggy

from . import hookspecs
from .errors import UnknownHookError
from .registry import KINDS, PluginRegistry, Register, registration_hook

log = logging.getLogger(__name__)

hookimpl = pluggy.HookimplMarker("compquant")
ENTRY_POINT_GROUP = "compquant"
BUILTIN_DISTRIBUTION = "compquant (built-in)"

_builtin_plugins: tuple[str, ...] = ()


def use_builtin_plugins(names: Sequence[str]) -> None:
    """Name the modules every plugin manager registers first: the package hands in its own list
    (`compquant.builtins.BUILTIN_PLUGINS`) when it is imported, so the core names no plugin."""
    global _builtin_plugins
    _builtin_plugins = tuple(names)
    default_plugin_manager.cache_clear()
    default_registry.cache_clear()


def create_plugin_manager(*, builtins: Sequence[str] | None = None, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the built-in plugins (``builtins``, default the package's own) and,
    unless disabled, every installed one. A plugin that implements a hook the specs do not know
    (most likely a misspelt name) is refused here, naming the plugin and the hook."""
    pm = pluggy.PluginManager("compquant")
    pm.add_hookspecs(hookspecs)
    for name in _builtin_plugins if builtins is None else builtins:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        for blocked in filter(None, os.environ.get("COMPQUANT_BLOCK_PLUGINS", "").split(",")):
            pm.set_blocked(blocked.strip())
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    check_hooks(pm)
    if os.environ.get("COMPQUANT_TRACE_HOOKS"):
        pm.trace.root.setwriter(log.debug)
        pm.enable_tracing()
    return pm


def check_hooks(pm: pluggy.PluginManager) -> None:
    """Every hook a registered plugin implements must be one of compquant's (pluggy's
    ``check_pending``), reported as an error that names the plugin, the hook and the fix."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        unknown = [name for name, caller in vars(pm.hook).items() if not name.startswith("_") and not caller.has_spec()
                   and any(impl.plugin is error.plugin for impl in caller.get_hookimpls())]
        raise UnknownHookError(
            f"plugin {pm.get_name(error.plugin)!r} implements {', '.join(map(repr, unknown))}, which is not a compquant "
            f"hook (a misspelt name?); the hooks are: {', '.join(sorted(_hook_names()))}"
        ) from None


def _hook_names() -> list[str]:
    return [name for name in vars(hookspecs) if name.startswith("compquant_")]


@functools.cache
def default_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager that the package's entry points use when given none."""
    return create_plugin_manager()


def build_registry(pm: pluggy.PluginManager) -> PluginRegistry:
    """Ask every plugin to register its objects, through pluggy's hook call (so hook wrappers and
    tracing see it), remembering which plugin and distribution each object came from."""
    registry = PluginRegistry()
    distributions = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    for kind in KINDS:
        caller = getattr(pm.hook, registration_hook(kind))
        impls = {_code(impl.function): impl for impl in caller.get_hookimpls()}

        def origin(impls=impls) -> tuple[str, str]:
            impl = _calling_impl(impls)
            if impl is None:
                return "unknown plugin", "registered at runtime"
            return impl.plugin_name, distributions.get(id(impl.plugin), _origin(impl.plugin_name))

        caller(register=Register(kind, registry, origin))
    return registry


def _code(function):
    return getattr(function, "__func__", function).__code__


def _calling_impl(impls: dict) -> pluggy.HookImpl | None:
    """The hook implementation on the call stack: the plugin that is registering right now."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in impls:
            return impls[frame.f_code]
        frame = frame.f_back
    return None


def _origin(plugin_name: str) -> str:
    return BUILTIN_DISTRIBUTION if plugin_name in _builtin_plugins else "registered at runtime"


@functools.cache
def default_registry() -> PluginRegistry:
    return build_registry(default_plugin_manager())


def registry_for(plugin_manager: pluggy.PluginManager | None) -> PluginRegistry:
    """The registry of ``plugin_manager``, or the process-wide one for None."""
    return default_registry() if plugin_manager is None else build_registry(plugin_manager)
