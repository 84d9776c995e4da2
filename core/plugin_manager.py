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

Built-in solvers, transforms and adapters register through exactly the same hooks. Two
environment variables control loading: ``COMPQUANT_BLOCK_PLUGINS`` (comma-separated entry-point
names not to load) and ``COMPQUANT_TRACE_HOOKS=1`` (log every hook call at DEBUG level).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import pluggy

from . import hookspecs
from .registry import KINDS, PluginRegistry, Register

log = logging.getLogger(__name__)

hookimpl = pluggy.HookimplMarker("compquant")
ENTRY_POINT_GROUP = "compquant"
BUILTIN_DISTRIBUTION = "compquant (built-in)"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "compquant.plugins.rtn",
    "compquant.plugins.gptq",
    "compquant.plugins.gptaq",
    "compquant.plugins.rescomp",
    "compquant.plugins.quarot",
    "compquant.plugins.spinquant",
    "compquant.models.llama",
    "compquant.models.deit",
)


def create_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the built-in plugins and, unless disabled, every installed one."""
    pm = pluggy.PluginManager("compquant")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        for blocked in filter(None, os.environ.get("COMPQUANT_BLOCK_PLUGINS", "").split(",")):
            pm.set_blocked(blocked.strip())
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    if os.environ.get("COMPQUANT_TRACE_HOOKS"):
        pm.trace.root.setwriter(log.debug)
        pm.enable_tracing()
    return pm


@functools.cache
def default_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager that `quantize` and the CLI use when given none."""
    return create_plugin_manager()


def build_registry(pm: pluggy.PluginManager) -> PluginRegistry:
    """Ask every plugin to register its objects, remembering which plugin and distribution each came from."""
    registry = PluginRegistry()
    distributions = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    for kind in KINDS:
        caller = getattr(pm.hook, f"compquant_register_{kind}s")
        for impl in caller.get_hookimpls():  # registration order: built-ins first
            distribution = distributions.get(id(impl.plugin), _origin(impl.plugin_name))
            impl.function(register=Register(kind, registry.table(kind), impl.plugin_name, distribution))
    return registry


def _origin(plugin_name: str) -> str:
    return BUILTIN_DISTRIBUTION if plugin_name in DEFAULT_PLUGINS else "registered at runtime"


@functools.cache
def default_registry() -> PluginRegistry:
    return build_registry(default_plugin_manager())
