"""The side-by-side table a newcomer runs first: full precision against each solver on one model,
WikiText-2 perplexity with the wall time and peak memory of every row."""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.config import QuantConfig
from ..core.measure import measure
from ..core.pipeline import quantize, resolve_device
from ..models.loading import load_model
from .datasets import calibration_windows
from .perplexity import perplexity

log = logging.getLogger(__name__)

EVALUATION_DATASET = "wikitext2"
PAPER_PROTOCOL = "paper protocol: 128 calibration windows of 2048 tokens; every 2048-token window of the test split"


@dataclass(frozen=True)
class CompareRow:
    method: str
    perplexity: float
    quantize_seconds: float
    eval_seconds: float
    peak_rss_mib: float
    mean_relative_error: float | None = None


@dataclass
class CompareResult:
    model: str
    bits: int
    group_size: int
    sym: bool
    calibration: str
    evaluation: str
    load_seconds: float
    torch_threads: int
    device: str
    solver_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: list[CompareRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        grid = f"W{self.bits} {'per-channel' if self.group_size == -1 else f'g{self.group_size}'} {'sym' if self.sym else 'asym'}"
        lines = [
            f"model: {self.model}   weights: {grid}   device: {self.device}, {self.torch_threads} torch threads",
            f"calibration: {self.calibration}",
            f"evaluation:  {self.evaluation}",
            *(f"{solver} options: {', '.join(f'{key}={value}' for key, value in options.items())}"
              for solver, options in self.solver_options.items() if options),
            f"({PAPER_PROTOCOL}; these reduced sizes are not comparable to published figures)",
            "",
            f"{'method':<10} {'wikitext2 ppl':>14} {'quantize s':>11} {'eval s':>8} {'peak RSS MiB':>13} {'mean rel. err':>14}",
        ]
        for row in self.rows:
            error = "-" if row.mean_relative_error is None else f"{row.mean_relative_error:.4f}"
            lines.append(
                f"{row.method:<10} {row.perplexity:>14.3f} {row.quantize_seconds:>11.1f} {row.eval_seconds:>8.1f} "
                f"{row.peak_rss_mib:>13.0f} {error:>14}"
            )
        lines.append(f"(model load: {self.load_seconds:.1f} s)")
        return "\n".join(lines)


def solver_run_config(config: QuantConfig, solver: str) -> QuantConfig:
    """``config`` for one row of the table: the config's solver options go to its own solver only
    (another solver may not know them)."""
    return config.model_copy(update={"solver": solver,
                                     "solver_options": config.solver_options if solver == config.solver else {}})


def compare(
    model: str,
    config: QuantConfig,
    *,
    solvers: tuple[str, ...] = ("rtn", "gptq"),
    eval_seqlen: int = 512,
    eval_limit: int | None = 64,
    data_dir: str | Path | None = None,
) -> CompareResult:
    """Load ``model`` once, evaluate it in full precision, then quantize a copy with each solver under
    ``config`` (its grid, calibration sizes, seed and device) and evaluate that."""
    device = resolve_device(config.device)
    with measure() as loading:
        loaded = load_model(model)
    fp_model = loaded.model.to(device).eval()
    cal = config.calibration
    runs = {solver: solver_run_config(config, solver) for solver in solvers}
    windows = calibration_windows(
        loaded.tokenizer, cal.dataset, nsamples=cal.nsamples, seqlen=cal.seqlen, seed=config.seed, data_dir=data_dir
    )

    def evaluate(m: torch.nn.Module):
        return perplexity(m, loaded.tokenizer, EVALUATION_DATASET, seqlen=eval_seqlen, limit=eval_limit, data_dir=data_dir)

    with measure() as fp_run:
        fp_ppl = evaluate(fp_model)
    result = CompareResult(
        model=loaded.source,
        bits=config.grid.bits,
        group_size=config.grid.group_size,
        sym=config.grid.sym,
        calibration=f"{cal.nsamples} random windows x {cal.seqlen} tokens of {cal.dataset} validation text (seed {config.seed})",
        evaluation=f"{fp_ppl.windows} windows x {fp_ppl.seqlen} tokens of {fp_ppl.dataset} test ({fp_ppl.tokens} tokens)",
        load_seconds=loading.seconds,
        torch_threads=torch.get_num_threads(),
        device=str(device),
        solver_options={solver: dict(run.solver_options) for solver, run in runs.items()},
    )
    result.rows.append(CompareRow("fp", fp_ppl.perplexity, 0.0, fp_run.seconds, fp_run.peak_rss_bytes / 2**20))
    for solver in solvers:
        quantized = copy.deepcopy(fp_model)
        with measure() as quant_run:
            report = quantize(quantized, runs[solver], calibration=windows)
        with measure() as eval_run:
            ppl = evaluate(quantized)
        peak = max(quant_run.peak_rss_bytes, eval_run.peak_rss_bytes) / 2**20
        result.rows.append(
            CompareRow(solver, ppl.perplexity, quant_run.seconds, eval_run.seconds, peak, report.mean_relative_error)
        )
        log.info("%s: perplexity %.3f", solver, ppl.perplexity)
        del quantized
    return result
