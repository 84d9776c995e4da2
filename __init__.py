"""compquant: post-training, weight-only quantization of transformers by compensation-based solvers.

    import compquant
    loaded = compquant.load_model("smollm2-135m")
    config = compquant.QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 128})
    report = compquant.quantize(loaded.model, config, tokenizer=loaded.tokenizer)
    print(compquant.perplexity(loaded.model, loaded.tokenizer, seqlen=512, limit=32))
    print(compquant.zero_shot(loaded.model, loaded.tokenizer, ["piqa", "arc_easy"], limit=100).table())
    compquant.save_quantized(loaded.model, loaded.tokenizer, "smol-w3", config=config, report=report)

Solvers, transforms and architecture adapters are plugins; see `compquant.core.plugin_manager`.
"""
from __future__ import annotations

from .core.adapter import ArchitectureAdapter
from .core.columns import ColumnOptions, CompensationTerm, FrozenValue, PreparedProblem, solve_columns
from .core.config import CalibrationConfig, GridConfig, QuantConfig
from .core.errors import CompquantError
from .core.layer import quantize_layer
from .core.online import attach_input_op
from .core.pipeline import quantize
from .core.plugin_manager import create_plugin_manager, hookimpl
from .core.quantizer import Grid, QuantParams
from .core.report import LayerReport, QuantReport
from .core.saving import save_quantized
from .core.solver import LayerResult, Solver, SolverOptions
from .core.statistics import Accumulator, LayerStatistics, Statistic
from .core.transform import Transform, TransformContext, TransformOptions
from .evaluation.perplexity import PerplexityResult, perplexity
from .evaluation.zeroshot import ZeroShotResult, zero_shot
from .models.loading import load_model

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "ArchitectureAdapter",
    "CalibrationConfig",
    "ColumnOptions",
    "CompensationTerm",
    "CompquantError",
    "FrozenValue",
    "Grid",
    "GridConfig",
    "LayerReport",
    "LayerResult",
    "LayerStatistics",
    "PerplexityResult",
    "PreparedProblem",
    "QuantConfig",
    "QuantParams",
    "QuantReport",
    "Solver",
    "SolverOptions",
    "Statistic",
    "Transform",
    "ZeroShotResult",
    "TransformContext",
    "TransformOptions",
    "attach_input_op",
    "create_plugin_manager",
    "hookimpl",
    "load_model",
    "perplexity",
    "quantize",
    "quantize_layer",
    "save_quantized",
    "solve_columns",
    "zero_shot",
]
