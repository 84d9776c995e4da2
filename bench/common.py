"""What the benchmark scripts share: the solver configurations they compare, by label,
SmolLM2-135M cut to its first blocks with calibration windows, a clock on a method, and the
resumable results file."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

SOLVERS: dict[str, tuple[str, dict]] = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "gptaq": ("gptaq", {}),
    "rescomp(gptq)": ("rescomp", {"base": "gptq"}),
    "rescomp(gptaq)": ("rescomp", {"base": "gptaq"}),
}


#: The learned family by label (docs/learners.md): CQE+ is SDE with cross-layer learning.
LEARNERS: dict[str, tuple[str, dict]] = {
    "lwc": ("lwc", {}),
    "lsi": ("lsi", {}),
    "sde": ("sde", {}),
    "cqe+": ("sde", {"lookahead": 1}),
}


def resumed_table(out: Path, settings: dict) -> dict:
    """The results already in ``out`` (``{"settings", "runs"}``), or a new table with ``settings``;
    a file written with other settings stops the script (exit 2) rather than mixing two tables."""
    done = json.loads(out.read_text()) if out.exists() else {"settings": settings, "runs": []}
    if done["settings"] != settings:
        print(f"{out} was written with other settings {done['settings']}; use those or another --out", file=sys.stderr)
        raise SystemExit(2)
    return done


def learner_of(spec: str) -> tuple[str, dict]:
    """A learner label with options of its own after colons (``sde:band=4:lookahead=2``): the
    learner's name and options (each value read as JSON where it parses, e.g. numbers)."""
    import json

    label, *settings = spec.split(":")
    if label not in LEARNERS:
        raise SystemExit(f"unknown learner {label!r}; use one of {sorted(LEARNERS)}")
    name, options = LEARNERS[label]
    options = dict(options)
    for setting in settings:
        key, _, value = setting.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def smollm2_blocks(blocks: int, nsamples: int, seqlen: int, data_dir: str) -> tuple[Any, Any]:
    """SmolLM2-135M with only its first ``blocks`` blocks, and ``nsamples`` × ``seqlen`` WikiText-2
    validation windows (seed 0) to calibrate it on."""
    import compquant
    from compquant.evaluation.datasets import calibration_windows

    loaded = compquant.load_model("smollm2-135m")
    model = loaded.model.eval()
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    windows = calibration_windows(loaded.tokenizer, "wikitext2", nsamples=nsamples, seqlen=seqlen, seed=0,
                                  data_dir=data_dir)
    return model, windows


class ClockedMethod:
    """While open, adds up the wall time spent in ``owner.name`` (a method, patched on its class or
    module), calls nested inside one counted once; ``before``, if given, runs ahead of each call and
    its time is added to ``waited`` instead (e.g. a barrier, to tell waiting for the other ranks
    from the work itself)."""

    def __init__(self, owner: Any, name: str, before=None) -> None:
        self.owner, self.name, self.before = owner, name, before
        self.seconds = self.waited = 0.0
        self.calls = 0
        self._depth = 0

    def __enter__(self) -> ClockedMethod:
        original = self._original = getattr(self.owner, self.name)

        def clocked(*args, **kwargs):
            if self._depth:
                return original(*args, **kwargs)
            if self.before is not None:
                started = time.perf_counter()
                self.before()
                self.waited += time.perf_counter() - started
            self._depth += 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1
                self._depth -= 1

        setattr(self.owner, self.name, clocked)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.owner, self.name, self._original)


class PhaseClocks:
    """While open, where a calibration run's wall time goes: block forwards, statistics accumulation,
    the solver's solves, the statistics' reductions across ranks and the gathers of solved rows;
    ``barrier`` (on several ranks), put in front of each collective, tells the time spent waiting
    for the slowest rank (idle) from the collective itself. `phases` adds the rest as "other"."""

    PHASES = ("forwards", "statistics", "reductions", "solves", "gathers", "idle", "other")

    def __init__(self, solver_class: type, barrier=None) -> None:
        from compquant.core import calibration, distributed
        from compquant.core.paused_forward import PausedForward

        self.clocks = {"forwards": [ClockedMethod(PausedForward, "advance"), ClockedMethod(calibration, "run_block")],
                       "statistics": [ClockedMethod(calibration._GroupStatistics, "add")],
                       "reductions": [ClockedMethod(distributed.Ranks, "combine", barrier),
                                      ClockedMethod(distributed.Ranks, "total", barrier)],
                       "solves": [ClockedMethod(solver_class, "solve")],
                       "gathers": [ClockedMethod(distributed.Ranks, "_gather_rows", barrier)]}

    def __enter__(self) -> PhaseClocks:
        for clock in self._every():
            clock.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for clock in self._every():
            clock.__exit__()

    def _every(self) -> list[ClockedMethod]:
        return [clock for group in self.clocks.values() for clock in group]

    def phases(self, wall_seconds: float) -> dict[str, float]:
        """Seconds per phase of a run that took ``wall_seconds`` while the clocks were open."""
        phases = {name: sum(clock.seconds for clock in group) for name, group in self.clocks.items()}
        phases["idle"] = sum(clock.waited for clock in self._every())
        phases["other"] = wall_seconds - sum(phases.values())
        return phases
