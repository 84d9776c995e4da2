"""Zero-shot accuracy with lm-evaluation-harness, on a model already in memory.

The model and tokenizer are wrapped in lm-eval's ``HFLM`` (so a quantized or transformed model is
scored as it stands), the tasks come from `task_configs` (local copies of the data, or lm-eval's hub
tasks), and lm-eval computes its own metrics; the result keeps accuracy (and length-normalized
accuracy where the task has it) with standard errors, per task, under the standard task names.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..core.dataset import resolve_data_dir
from ..core.finite import check_metric
from .perplexity import NON_FINITE_LOGITS
from .task_configs import build_tasks, check_tasks, hub_offline

ZEROSHOT_FILE = "zeroshot.json"
"""Written beside a compquant output folder's model by `compquant eval --tasks`."""
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai")


@dataclass(frozen=True)
class TaskScore:
    """lm-eval's metrics for one task; None where the task does not have the metric."""

    task: str
    docs: int
    """Documents evaluated (after ``limit``)."""
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    perplexity: float | None = None
    """Perplexity of the target word (lambada_openai)."""

    @classmethod
    def from_lm_eval(cls, task: str, metrics: Mapping[str, Any], docs: int) -> TaskScore:
        """From lm-eval's per-task result dict, whose keys read ``"<metric>,<filter>"``."""
        values = {key.split(",")[0]: value for key, value in metrics.items() if "," in key}

        def number(name: str) -> float | None:
            value = values.get(name)
            return float(value) if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" for one doc

        return cls(task, docs, number("acc"), number("acc_stderr"), number("acc_norm"),
                   number("acc_norm_stderr"), number("perplexity"))


@dataclass(frozen=True)
class ZeroShotResult:
    scores: dict[str, TaskScore]
    """By task name, in the order asked."""
    limit: int | None
    """Documents per task at most; None for every document."""
    data_dir: str | None
    """The local data folder, or None for lm-eval's hub tasks."""
    lm_eval_version: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """One row per task: documents, accuracy and normalized accuracy in percent with their
        standard errors, and perplexity where the task reports it."""

        def percent(value: float | None, stderr: float | None) -> str:
            if value is None:
                return "-"
            return f"{100 * value:.2f}" + ("" if stderr is None else f" ± {100 * stderr:.2f}")

        header = f"{'task':<15} {'docs':>6} {'acc %':>15} {'acc_norm %':>15} {'ppl':>9}"
        lines = [header]
        for score in self.scores.values():
            ppl = "-" if score.perplexity is None else f"{score.perplexity:.4g}"
            lines.append(
                f"{score.task:<15} {score.docs:>6} {percent(score.acc, score.acc_stderr):>15} "
                f"{percent(score.acc_norm, score.acc_norm_stderr):>15} {ppl:>9}"
            )
        source = f"local data in {self.data_dir}" if self.data_dir else "lm-eval's hub tasks"
        limit = "every document" if self.limit is None else f"at most {self.limit} documents per task"
        lines.append(f"(lm-eval {self.lm_eval_version}, zero-shot, {limit}, {source}; {self.seconds:.0f} s)")
        return "\n".join(lines)


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"piqa, arc_easy"`` or ``["piqa", "arc_easy"]`` → ``["piqa", "arc_easy"]``, duplicates dropped."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    cleaned = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    if not cleaned:
        raise ValueError(f"name at least one task, e.g. {','.join(DEFAULT_TASKS)}")
    return cleaned


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
) -> ZeroShotResult:
    """Zero-shot lm-eval scores of ``model`` (a transformers causal LM, evaluated where it lies) on
    ``tasks``. The data folder is ``data_dir``, else $COMPQUANT_DATA_DIR; with one, the tasks read
    its local copies with the hub switched off; without, lm-eval's own tasks download their data.
    ``limit`` caps the documents per task (the first ones); ``bootstrap_iters`` only sizes the
    bootstrap of lambada's perplexity error (accuracy errors are closed-form), which lm-eval would
    otherwise draw 100,000 times."""
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of documents, got {limit}")
    folder = resolve_data_dir(data_dir)
    check_tasks(names, folder)
    import lm_eval
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    with ExitStack() as stack:
        if folder is not None:
            stack.enter_context(hub_offline())
        stack.enter_context(_bootstrap_in_process())
        loaded = build_tasks(names, folder)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = evaluate(lm=lm, task_dict={"tasks": loaded}, limit=limit, bootstrap_iters=bootstrap_iters,
                           log_samples=False)
    scores = {
        name: TaskScore.from_lm_eval(name, results["results"][name], results["n-samples"][name]["effective"])
        for name in loaded
    }
    for score in scores.values():
        for metric in ("acc", "acc_norm", "perplexity"):
            if getattr(score, metric) is not None:
                check_metric(f"{score.task} {metric}", getattr(score, metric), NON_FINITE_LOGITS)
    return ZeroShotResult(scores, limit, None if folder is None else str(folder), lm_eval.__version__,
                          time.perf_counter() - start)


@contextmanager
def _bootstrap_in_process() -> Iterator[None]:
    """lm-eval bootstraps a perplexity's standard error in a pool of one process per CPU unless
    DISABLE_MULTIPROC is set; keep it in this process, which holds the model and its thread setting."""
    previous = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = previous
