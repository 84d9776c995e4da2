"""Every hook compquant calls, grouped by the phase of a run in which it is called.

A plugin implements any of them with ``@compquant.hookimpl`` and is loaded either as a built-in
(``compquant.core.plugin_manager.DEFAULT_PLUGINS``) or from the entry-point group ``compquant``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from .adapter import ArchitectureAdapter
    from .config import QuantConfig
    from .registry import Register
    from .report import LayerReport, QuantReport
    from .solver import LayerResult, Solver
    from .transform import Transform

hookspec = pluggy.HookspecMarker("compquant")


# ------------------------------------------------------------------------------------ registration
@hookspec
def compquant_register_solvers(register: Register[Solver]) -> None:
    """Called once when the registry is built. Call ``register(name, solver)`` for each solver the
    plugin provides; ``solver`` is a `compquant.Solver` instance."""


@hookspec
def compquant_register_transforms(register: Register[Transform]) -> None:
    """Called once when the registry is built. Call ``register(name, transform)`` for each
    function-preserving model transform (`compquant.Transform`) the plugin provides."""


@hookspec
def compquant_register_adapters(register: Register[ArchitectureAdapter]) -> None:
    """Called once when the registry is built. Call ``register(name, adapter)`` for each
    architecture adapter (`compquant.ArchitectureAdapter`) the plugin provides."""


# ------------------------------------------------------------------------------ before calibration
@hookspec
def compquant_before_calibration(model: nn.Module, adapter: ArchitectureAdapter, config: QuantConfig) -> None:
    """Called after the configured transforms ran and before the first block is calibrated. The
    model may still be changed here, as long as its function is preserved."""


# ----------------------------------------------------------------------------------------- per block
@hookspec
def compquant_after_block(index: int, block: nn.Module, report: QuantReport) -> None:
    """Called after every linear of block ``index`` was quantized and the calibration inputs were
    propagated through it. ``report`` holds the layer reports so far."""


# ----------------------------------------------------------------------------------------- per layer
@hookspec
def compquant_after_layer(name: str, layer: nn.Module, result: LayerResult, report: LayerReport) -> None:
    """Called after a linear's weight was replaced by its quantized version. ``name`` is the
    linear's path in the model, ``result`` the solver's codes and grids, ``report`` its error."""


# ------------------------------------------------------------------------------- after calibration
@hookspec
def compquant_after_calibration(model: nn.Module, report: QuantReport, config: QuantConfig) -> None:
    """Called once every block is done, before anything is saved. ``report`` is complete."""
