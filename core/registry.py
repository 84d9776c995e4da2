"""The registry of solvers, transforms and adapters that plugins registered, with their provenance."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from .adapter import ArchitectureAdapter
from .errors import PluginConflictError, UnknownPluginError
from .solver import Solver
from .transform import Transform

if TYPE_CHECKING:
    from torch import nn

T = TypeVar("T")

KINDS: dict[str, type] = {"solver": Solver, "transform": Transform, "adapter": ArchitectureAdapter}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered plugin object and where it came from."""

    kind: str
    name: str
    obj: T
    plugin: str
    distribution: str


class Register(Generic[T]):
    """Handed to a registration hook; call it once per object the plugin provides."""

    def __init__(self, kind: str, table: dict[str, Entry[T]], plugin: str, distribution: str) -> None:
        self._kind, self._table, self._plugin, self._distribution = kind, table, plugin, distribution

    def __call__(self, name: str, obj: T) -> None:
        expected = KINDS[self._kind]
        if not isinstance(obj, expected):
            raise TypeError(
                f"plugin {self._plugin!r} registered {self._kind} {name!r} as a {type(obj).__name__}; "
                f"it must be an instance of compquant.{expected.__name__}"
            )
        if name in self._table:
            other = self._table[name]
            raise PluginConflictError(
                f"{self._kind} {name!r} is registered twice: by plugin {other.plugin!r} ({other.distribution}) "
                f"and by plugin {self._plugin!r} ({self._distribution}); uninstall or block one of them "
                "(COMPQUANT_BLOCK_PLUGINS=name)"
            )
        self._table[name] = Entry(self._kind, name, obj, self._plugin, self._distribution)


@dataclass
class PluginRegistry:
    """Everything the loaded plugins registered, by kind and name."""

    solvers: dict[str, Entry[Solver]] = field(default_factory=dict)
    transforms: dict[str, Entry[Transform]] = field(default_factory=dict)
    adapters: dict[str, Entry[ArchitectureAdapter]] = field(default_factory=dict)

    def table(self, kind: str) -> dict[str, Entry]:
        return {"solver": self.solvers, "transform": self.transforms, "adapter": self.adapters}[kind]

    def entries(self) -> Iterable[Entry]:
        for kind in KINDS:
            yield from self.table(kind).values()

    def get(self, kind: str, name: str):
        table = self.table(kind)
        if name not in table:
            available = ", ".join(sorted(table)) or "none"
            raise UnknownPluginError(
                f"unknown {kind} {name!r}; available {kind}s: {available}. "
                f"Check the spelling, or install the package that provides it (`compquant plugins` lists what is loaded)."
            )
        return table[name].obj

    def solver(self, name: str) -> Solver:
        return self.get("solver", name)

    def transform(self, name: str) -> Transform:
        return self.get("transform", name)

    def adapter(self, name: str) -> ArchitectureAdapter:
        return self.get("adapter", name)

    def adapter_for(self, model: nn.Module, name: str | None = None) -> ArchitectureAdapter:
        """The adapter named ``name``, or the first registered one that recognises ``model``."""
        if name is not None:
            return self.adapter(name)
        for entry in self.adapters.values():
            if entry.obj.matches(model):
                return entry.obj
        raise UnknownPluginError(
            f"no registered adapter recognises a {type(model).__name__}; available adapters: "
            f"{', '.join(sorted(self.adapters)) or 'none'}. Name one with --adapter, or install a plugin for this architecture."
        )
