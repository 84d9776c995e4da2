"""The registry of everything plugins registered, keyed by kind, with where each object came from.

Adding a kind of plugin is one entry in `KINDS` (its base class) and one registration hook in
`compquant.core.hookspecs` named ``compquant_register_<kind>s``; the registry, the plugin manager
and ``compquant plugins`` handle every kind the same way.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .adapter import ArchitectureAdapter
from .dataset import Dataset
from .errors import PluginConflictError, UnknownPluginError
from .exporters.base import Exporter
from .learner import Learner
from .online import OnlineOp
from .solver import Solver
from .transform import Transform

if TYPE_CHECKING:
    from torch import nn

T = TypeVar("T")

#: Every kind of plugin object, by kind name, with the class each registered object must be.
KINDS: dict[str, type] = {
    "solver": Solver,
    "transform": Transform,
    "adapter": ArchitectureAdapter,
    "exporter": Exporter,
    "dataset": Dataset,
    "online_op": OnlineOp,
    "learner": Learner,
}
#: Kinds whose plugins register classes (built when a saved model is loaded), not instances.
CLASS_KINDS = frozenset({"online_op"})


def registration_hook(kind: str) -> str:
    """The name of the hook through which plugins register objects of ``kind``."""
    return f"compquant_register_{kind}s"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered plugin object and where it came from."""

    kind: str
    name: str
    obj: T
    plugin: str
    distribution: str


class Register(Generic[T]):
    """Handed to a registration hook; call it once per object the plugin provides. ``origin``
    tells, at each call, which plugin and distribution is registering."""

    def __init__(self, kind: str, registry: PluginRegistry, origin: Any) -> None:
        self._kind, self._table, self._origin = kind, registry.table(kind), origin

    def __call__(self, name: str, obj: T) -> None:
        plugin, distribution = self._origin()
        expected = KINDS[self._kind]
        if self._kind in CLASS_KINDS:
            if not (isinstance(obj, type) and issubclass(obj, expected)):
                raise TypeError(f"plugin {plugin!r} registered {self._kind} {name!r} as {obj!r}; it must be a subclass "
                                f"of compquant.{expected.__name__} (the class itself, not an instance)")
        elif not isinstance(obj, expected):
            raise TypeError(
                f"plugin {plugin!r} registered {self._kind} {name!r} as a {type(obj).__name__}; "
                f"it must be an instance of compquant.{expected.__name__}"
            )
        if name in self._table:
            other = self._table[name]
            raise PluginConflictError(
                f"{self._kind} {name!r} is registered twice: by plugin {other.plugin!r} ({other.distribution}) "
                f"and by plugin {plugin!r} ({distribution}); uninstall or block one of them "
                "(COMPQUANT_BLOCK_PLUGINS=name)"
            )
        self._table[name] = Entry(self._kind, name, obj, plugin, distribution)


@dataclass
class PluginRegistry:
    """Everything the loaded plugins registered: one table of entries per kind."""

    tables: dict[str, dict[str, Entry]] = field(default_factory=lambda: {kind: {} for kind in KINDS})

    def table(self, kind: str) -> dict[str, Entry]:
        """The entries of ``kind`` by name, in registration order."""
        if kind not in self.tables:
            raise KeyError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self.tables[kind]

    def names(self, kind: str) -> list[str]:
        return list(self.table(kind))

    def entries(self) -> Iterable[Entry]:
        for table in self.tables.values():
            yield from table.values()

    def get(self, kind: str, name: str) -> Any:
        """The object registered as ``name`` of ``kind``; an unknown name lists what is available."""
        table = self.table(kind)
        if name not in table:
            available = ", ".join(sorted(table)) or "none"
            raise UnknownPluginError(
                f"unknown {kind} {name!r}; available {kind}s: {available}. "
                f"Check the spelling, or install the package that provides it (`compquant plugins` lists what is loaded)."
            )
        return table[name].obj

    def name_of(self, kind: str, obj: Any) -> str:
        """The name ``obj`` is registered under as a ``kind``; an unregistered object is an error."""
        for entry in self.table(kind).values():
            if entry.obj is obj:
                return entry.name
        shown = getattr(obj, "__qualname__", type(obj).__name__)
        raise UnknownPluginError(
            f"{shown} is not a registered {kind}; register it from your plugin (compquant_register_{kind}s) so that "
            "compquant can rebuild it when the model is loaded"
        )

    def adapter_for(self, model: nn.Module, name: str | None = None) -> ArchitectureAdapter:
        """The adapter named ``name``, or the first registered one that recognises ``model``."""
        if name is not None:
            adapter = self.get("adapter", name)
            misfit = adapter.misfit(model)
            if misfit is not None:
                fitting = [entry.name for entry in self.table("adapter").values() if entry.obj.matches(model)]
                raise UnknownPluginError(
                    f"adapter {name!r} does not fit this {type(model).__name__}: {misfit}; "
                    + (f"drop --adapter to use the detected one ({', '.join(fitting)})" if fitting else
                       "no registered adapter recognises it: install a plugin for this architecture")
                )
            return adapter
        for entry in self.table("adapter").values():
            if entry.obj.matches(model):
                return entry.obj
        raise UnknownPluginError(
            f"no registered adapter recognises a {type(model).__name__}; available adapters: "
            f"{', '.join(sorted(self.table('adapter'))) or 'none'}. Name one with --adapter, or install a plugin for "
            "this architecture."
        )
