"""compquant: post-training, weight-only quantization of transformers by compensation-based solvers.

    import compquant
    loaded = compquant.load_model("smollm2-135m")
    config = compquant.QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 128})
    report = compquant.quantize(loaded.model, config, tokenizer=loaded.tokenizer)
    print(compquant.perplexity(loaded.model, loaded.tokenizer, seqlen=512, limit=32))
    print(compquant.zero_shot(loaded.model, loaded.tokenizer, ["piqa", "arc_easy"], limit=100).table())
    compquant.save_quantized(loaded.model, loaded.tokenizer, "smol-w3", config=config, report=report)

Solvers, learners, transforms, architecture adapters, exporters and datasets are plugins
(docs/plugins.md).
The layers import one way: `compquant.core` at the bottom, then `plugins` and `models`, then
`evaluation`, then the modules here (`api`, `cli`, `builtins`).
"""
from __future__ import annotations

# Absolute imports: pytest (9.2 and 8.0) imports this file on its own when it collects the repository
# root, which is the package, from a folder whose name is no identifier (a CI clone, say).
from compquant.api import quantize
from compquant.builtins import BUILTIN_PLUGINS
from compquant.core.adapter import ArchitectureAdapter
from compquant.core.columns import ColumnOptions, CompensationTerm, FrozenValue, PreparedProblem, solve_columns
from compquant.core.config import CalibrationConfig, GridConfig, QuantConfig
from compquant.core.dataset import Dataset, ImageDataset, TextDataset
from compquant.core.errors import CompquantError
from compquant.core.exporters import Exporter, ExportJob
from compquant.core.layer import quantize_layer
from compquant.core.learner import (BlockTask, GradientLearner, LearnedBlock, Learner, LearnerOptions,
                                    LinearParametrization)
from compquant.core.online import OnlineOp, attach_attention_op, attach_input_op
from compquant.core.plugin_manager import create_plugin_manager, hookimpl, use_builtin_plugins
from compquant.core.qlinear import QuantizedLinear
from compquant.core.quantizer import Grid, GroupRanges, QuantParams
from compquant.core.report import LayerReport, QuantReport
from compquant.core.routing import UnfusedExperts, feeds_every_token, routed_to
from compquant.core.saving import save_quantized
from compquant.core.solver import LayerResult, Solver, SolverOptions
from compquant.core.statistics import Accumulator, LayerStatistics, Statistic
from compquant.core.transform import Transform, TransformContext, TransformOptions
from compquant.evaluation.perplexity import PerplexityResult, perplexity
from compquant.evaluation.zeroshot import ZeroShotResult, zero_shot
from compquant.models.loading import load_model

# The core names no plugin: the package hands it its own (no registry is built before first use).
use_builtin_plugins(BUILTIN_PLUGINS)

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "ArchitectureAdapter",
    "BlockTask",
    "CalibrationConfig",
    "ColumnOptions",
    "CompensationTerm",
    "CompquantError",
    "Dataset",
    "ExportJob",
    "Exporter",
    "FrozenValue",
    "GradientLearner",
    "Grid",
    "GridConfig",
    "GroupRanges",
    "ImageDataset",
    "LayerReport",
    "LayerResult",
    "LayerStatistics",
    "LearnedBlock",
    "Learner",
    "LearnerOptions",
    "LinearParametrization",
    "OnlineOp",
    "PerplexityResult",
    "PreparedProblem",
    "QuantConfig",
    "QuantParams",
    "QuantReport",
    "QuantizedLinear",
    "Solver",
    "SolverOptions",
    "Statistic",
    "TextDataset",
    "Transform",
    "TransformContext",
    "TransformOptions",
    "UnfusedExperts",
    "ZeroShotResult",
    "attach_attention_op",
    "attach_input_op",
    "create_plugin_manager",
    "feeds_every_token",
    "hookimpl",
    "load_model",
    "perplexity",
    "quantize",
    "quantize_layer",
    "routed_to",
    "save_quantized",
    "solve_columns",
    "zero_shot",
]
