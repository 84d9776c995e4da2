"""`quantize_layer`: one solver on one linear layer, without a model."""
from __future__ import annotations

from typing import Any

import pluggy
import torch
from torch import Tensor

from .config import GridConfig
from .plugin_manager import registry_for
from .solver import LayerResult
from .statistics import StatisticsAccumulator, needs_fp_inputs

GRID_OPTIONS = ("clip", "convention")


def quantize_layer(
    weight: Tensor,
    inputs: Tensor | None,
    *,
    solver: str = "gptq",
    fp_inputs: Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    stats_dtype: torch.dtype = torch.float32,
    plugin_manager: pluggy.PluginManager | None = None,
    **options: Any,
) -> LayerResult:
    """Quantize ``weight`` (out, in) given calibration ``inputs`` (tokens, in) as the quantized model
    sees them and, for solvers that use them, ``fp_inputs`` as the full-precision model sees them.

    ``options`` are the grid's ``clip`` and ``convention`` and the solver's own options
    (``percdamp``, ``blocksize``, ``act_order``, ...). Statistics are accumulated, and the solve runs,
    in ``stats_dtype``: exactly what the model-level loop does for one linear.
    """
    grid_values = {key: options.pop(key) for key in GRID_OPTIONS if key in options}
    grid = GridConfig(bits=bits, group_size=group_size, sym=sym, **grid_values).grid()
    chosen = registry_for(plugin_manager).get("solver", solver)
    solver_options = chosen.options(options)
    wanted = chosen.statistics(solver_options)
    stats = None
    if wanted:
        if inputs is None:
            raise ValueError(f"solver {solver!r} needs calibration inputs")
        takes_fp_inputs = needs_fp_inputs(wanted)
        if takes_fp_inputs and fp_inputs is None:
            raise ValueError(f"solver {solver!r} with these options needs fp_inputs (the full-precision model's inputs)")
        accumulator = StatisticsAccumulator(weight.shape[1], wanted, dtype=stats_dtype, device=weight.device)
        accumulator.add(inputs, fp_inputs if takes_fp_inputs else None)
        stats = accumulator.result()
    return chosen.solve(weight, stats, grid, solver_options)
