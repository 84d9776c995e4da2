"""Where zero-shot tasks come from: the project's lm-evaluation-harness task YAMLs over local copies
of the data, or lm-eval's own hub-backed tasks when no data folder is set.

``tasks/`` holds one YAML per task (piqa, arc_easy, arc_challenge, hellaswag, winogrande,
lambada_openai, boolq) with lm-eval's prompts and metrics over the JSON-lines files of the shared
data folder. Each names its file relative to the data folder, whose absolute path is only known at
run time: the YAML is read here, the file resolved and checked, and the finished config handed to
lm-eval's ``TaskManager`` as an inline task. Nothing is written to disk, and lm-eval's own registry,
which has tasks of the same names reading the hub, is never consulted for a local run.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..core.errors import CompquantError, DataNotFoundError
from ..core.dataset import DATA_DIR_ENV

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

TASKS_DIR = Path(__file__).with_name("tasks")


def local_tasks() -> list[str]:
    """The tasks that have a local YAML, by their standard lm-eval names."""
    return sorted(path.stem for path in TASKS_DIR.glob("*.yaml"))


def check_tasks(names: Sequence[str], folder: str | Path | None) -> None:
    """Fail now on what `build_tasks` would fail on later, before a model is loaded: lm-eval not
    installed or, with a data folder, a task without a local copy or a missing data file."""
    if importlib.util.find_spec("lm_eval") is None:
        raise CompquantError(
            "zero-shot evaluation needs lm-evaluation-harness, which is not installed; "
            "install it with: pip install 'compquant[eval]'"
        )
    if folder is not None:
        for name in names:
            local_config(name, folder)


def local_config(name: str, folder: str | Path) -> dict[str, Any]:
    """The lm-eval config of local task ``name`` with its data files resolved against ``folder``."""
    if name not in local_tasks():
        raise ValueError(
            f"no local copy of task {name!r}; local tasks: {', '.join(local_tasks())}. For another lm-eval "
            f"task, leave --data-dir and {DATA_DIR_ENV} unset to use lm-eval's hub tasks (online)"
        )
    config = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    resolved = {}
    for split, relative in config["dataset_kwargs"]["data_files"].items():
        path = Path(folder) / relative
        if not path.is_file():
            raise DataNotFoundError(
                f"{name}: data file {path} does not exist. Put the file at <data folder>/{relative} "
                f"(the layout of the project's shared data folder) and pass --data-dir <data folder> "
                f"or set {DATA_DIR_ENV}=<data folder>."
            )
        resolved[split] = str(path.resolve())
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved}
    return config


def build_tasks(names: Sequence[str], folder: str | Path | None) -> dict[str, Task]:
    """lm-eval ``Task`` objects for ``names``, keyed by name: the local copies in ``folder``, or
    lm-eval's own tasks (downloaded from the hub) when ``folder`` is None."""
    from lm_eval.tasks import TaskManager

    if folder is None:
        return _hub_tasks(names, TaskManager())
    configs = [local_config(name, folder) for name in names]  # every file checked before any is read
    with hub_offline():
        return TaskManager(include_defaults=False).load(configs)["tasks"]


def _hub_tasks(names: Sequence[str], manager: TaskManager) -> dict[str, Task]:
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval has no task named {', '.join(map(repr, unknown))}; check the spelling")
    try:
        return manager.load(list(names))["tasks"]
    except Exception as error:  # offline, or the hub's own errors
        raise DataNotFoundError(
            f"lm-eval could not load {', '.join(names)} from the hub ({type(error).__name__}: {error}). "
            f"Offline, pass --data-dir <data folder> or set {DATA_DIR_ENV}=<data folder> to use the local copies "
            f"of {', '.join(local_tasks())}."
        ) from error


_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextmanager
def hub_offline() -> Iterator[None]:
    """Inside the block, `datasets` and `huggingface_hub` make no network request (not even the
    download-count ping `datasets` sends for a local json file, which waits for a time-out on a machine
    without network). Both read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, at import, so their module
    constants are switched along with the environment; everything is restored on exit."""
    import datasets.config
    import huggingface_hub.constants

    with ExitStack() as restore:
        for variable in _OFFLINE_VARIABLES:
            restore.callback(_restore_variable, variable, os.environ.get(variable))
            os.environ[variable] = "1"
        for module, constant in (
            (datasets.config, "HF_HUB_OFFLINE"),
            (datasets.config, "HF_DATASETS_OFFLINE"),
            (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        ):
            restore.callback(setattr, module, constant, getattr(module, constant))
            setattr(module, constant, True)
        yield


def _restore_variable(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
