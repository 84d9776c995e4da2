"""Every hook compquant calls, grouped by the phase of a run in which it is called.

A plugin implements any of them with ``@compquant.hookimpl`` and is loaded either as a built-in
(`compquant.builtins`) or from the entry-point group ``compquant``. docs/plugins.md is the guide.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from .adapter import ArchitectureAdapter
    from .config import QuantConfig
    from .dataset import Dataset
    from .exporters.base import Exporter
    from .learner import Learner
    from .online import OnlineOp
    from .registry import Register
    from .report import LayerReport, QuantReport
    from .solver import LayerResult, Solver
    from .transform import Transform

hookspec = pluggy.HookspecMarker("compquant")


# ------------------------------------------------------------------------------------ registration
# Called once each when a registry is built. Call ``register(name, obj)`` for every object of the
# kind the plugin provides; a name registered twice is an error naming both plugins.
@hookspec
def compquant_register_solvers(register: Register[Solver]) -> None:
    """Register solvers (`compquant.Solver` instances): one linear's weight and statistics in,
    quantized weights out."""


@hookspec
def compquant_register_transforms(register: Register[Transform]) -> None:
    """Register function-preserving model transforms (`compquant.Transform` instances)."""


@hookspec
def compquant_register_adapters(register: Register[ArchitectureAdapter]) -> None:
    """Register architecture adapters (`compquant.ArchitectureAdapter` instances)."""


@hookspec
def compquant_register_exporters(register: Register[Exporter]) -> None:
    """Register checkpoint formats (`compquant.Exporter` instances); the name is what
    ``--format`` takes."""


@hookspec
def compquant_register_datasets(register: Register[Dataset]) -> None:
    """Register calibration and evaluation data (`compquant.TextDataset` or
    `compquant.ImageDataset` instances); the name is what ``--calib`` and ``--ppl`` take."""


@hookspec
def compquant_register_online_ops(register: Register[type[OnlineOp]]) -> None:
    """Register online operation types (`compquant.OnlineOp` subclasses, the classes themselves):
    the only types a saved model's ``compquant_online_ops.json`` can name, so loading a checkpoint
    builds nothing else."""


@hookspec
def compquant_register_learners(register: Register[Learner]) -> None:
    """Register learners (`compquant.Learner` instances): trained per block, before its linears are
    quantized, towards the full-precision block's outputs; the name is what ``--learner`` takes."""


# ------------------------------------------------------------------------------ before calibration
@hookspec
def compquant_before_calibration(model: nn.Module, adapter: ArchitectureAdapter, config: QuantConfig) -> None:
    """Called after the configured transforms ran and before the first block is calibrated. The
    model may still be changed here, as long as its function is preserved."""


# ----------------------------------------------------------------------------------------- per layer
@hookspec
def compquant_after_layer(
    name: str, layer: nn.Module, result: LayerResult, layer_report: LayerReport, report: QuantReport
) -> None:
    """Called after a linear's weight was replaced by its quantized version. ``name`` is the
    linear's path in the model, ``result`` the solver's codes and grids, ``layer_report`` its
    error and time, ``report`` the run's report so far (this layer included)."""


# ----------------------------------------------------------------------------------------- per block
@hookspec
def compquant_after_block(index: int, block: nn.Module, report: QuantReport) -> None:
    """Called after every linear of block ``index`` was quantized and the calibration inputs were
    propagated through it. ``report`` is the run's report so far."""


# ------------------------------------------------------------------------------- after calibration
@hookspec
def compquant_after_calibration(model: nn.Module, report: QuantReport, config: QuantConfig) -> None:
    """Called once every block is done, before anything is saved. ``report`` is complete."""
