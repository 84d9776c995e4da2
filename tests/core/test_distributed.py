"""A run on 2 gloo ranks gives the integer codes and the resume checkpoint of a run on one process,
for every solver and both loops (docs/methods.md §4, "Several ranks")."""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compquant.core.distributed import NotCombinableError, Ranks
from compquant.core.statistics import Accumulator, Statistic, StatisticsAccumulator

WORKER = Path(__file__).with_name("distributed_worker.py")
BASE = {"grid": {"bits": 3, "group_size": 32}, "stats_dtype": "float64", "calibration": {"batch_size": 2}}
SOLVERS = [
    {"solver": "rtn"},
    {"solver": "gptq", "solver_options": {"act_order": True}},
    {"solver": "gptaq"},
    {"solver": "rescomp", "solver_options": {"base": "gptaq"}},
    {"solver": "rescomp", "solver_options": {"base": "gptq"}},
]
CASES = [{**BASE, **solver, "calibration": {**BASE["calibration"], "sequential": loop}}
         for loop in ("groups", "blocks") for solver in SOLVERS]
CASES.append({**BASE, "solver": "gptaq", "calibration": {**BASE["calibration"], "fp_inputs": "stream"}})


def with_checkpoint(folder: Path) -> list[dict]:
    """The cases, and GPTAQ (two streams) once more keeping its checkpoint in ``folder/ranks-N``."""
    return [*CASES, {**BASE, "solver": "gptaq", "resume_dir": str(folder / "ranks-{ranks}")}]


def case_name(case: dict) -> str:
    options = ",".join(f"{key}={value}" for key, value in case.get("solver_options", {}).items())
    return f"{case['solver']}({options}) {case['calibration']}"


def codes_on_two_ranks_and_one(folder: Path, calibration: torch.Tensor, cases: list[dict]) -> tuple[list, list]:
    """Every case's codes of the model saved in ``folder/model``: from one torchrun of 2 gloo ranks,
    and from this process alone."""
    torch.save(calibration, folder / "calibration.pt")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "COMPQUANT_NO_PROGRESS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
               str(folder / "model"), str(folder / "calibration.pt"), json.dumps(cases), str(folder / "codes.pt")]
    run = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    one = runpy.run_path(str(WORKER))["codes_of_every_case"](str(folder / "model"), calibration, cases)
    return torch.load(folder / "codes.pt"), one


def differing(cases: list[dict], two: list[dict], one: list[dict]) -> list[str]:
    """The linears, case by case, whose codes differ between the two runs."""
    return [f"{case_name(case)}: {name}" for case, a, b in zip(cases, two, one) for name in b
            if not torch.equal(a[name], b[name])]


def test_two_ranks_give_the_codes_and_checkpoint_of_one_process_for_every_solver_and_loop(make_llama, token_batches,
                                                                                          tmp_path):
    """One torchrun of 2 gloo ranks runs every case; this process runs them again alone. 5 windows in
    batches of 2 are 3 batches, shared 2 + 1, so the token weighting of the combined statistics counts."""
    make_llama(seed=0).save_pretrained(tmp_path / "model")
    cases = with_checkpoint(tmp_path)
    two, one = codes_on_two_ranks_and_one(tmp_path, token_batches(5, 16, seed=0), cases)
    differ = differing(cases, two, one)
    assert all(len(codes) == 14 for codes in one) and [a.keys() for a in two] == [b.keys() for b in one]
    assert not differ, differ
    # rank 0 writes the checkpoint one process would: the streams gathered in batch order
    written = {ranks: load_file(tmp_path / f"ranks-{ranks}" / "stream_into_00002.safetensors") for ranks in (1, 2)}
    streams = {f"{stream}.{batch}" for stream in ("hidden", "fp") for batch in range(3)}
    assert written[1].keys() == written[2].keys() == streams
    for key, tensor in written[1].items():
        torch.testing.assert_close(written[2][key], tensor, rtol=1e-6, atol=1e-7, msg=key)
    blocks = {ranks: load_file(tmp_path / f"ranks-{ranks}" / "block_00001.safetensors") for ranks in (1, 2)}
    codes = [key for key in blocks[1] if key.endswith(".codes")]
    assert len(codes) == 7 and all(torch.equal(blocks[1][key], blocks[2][key]) for key in codes)


MOE_CASES = [{**BASE, "solver": "gptq", "calibration": {**BASE["calibration"], "expert_min_tokens": 40}},
             {**BASE, "solver": "gptaq", "calibration": {**BASE["calibration"], "sequential": "blocks",
                                                        "expert_min_tokens": 40, "expert_fallback": "rtn"}}]


def test_two_ranks_route_and_fall_back_like_one_process_on_a_mixture_of_experts(make_moe, token_batches, tmp_path):
    """Each expert's statistics are those of the tokens routed to it on every rank, and whether it
    has too few is decided on the combined count: an expert that falls back on one process falls
    back on 2 ranks too (with neither fallback), and every code is the same."""
    import compquant

    make_moe("qwen3_moe", seed=0).save_pretrained(tmp_path / "model")
    calibration = token_batches(5, 16, seed=0)
    alone = compquant.quantize(make_moe("qwen3_moe", seed=0), compquant.QuantConfig(**MOE_CASES[0]),
                               calibration=calibration)
    fell_back = [layer.name for layer in alone.layers if layer.fallback]
    assert fell_back and len(fell_back) < sum(layer.routed_tokens is not None for layer in alone.layers)
    two, one = codes_on_two_ranks_and_one(tmp_path, calibration, MOE_CASES)
    differ = differing(MOE_CASES, two, one)
    assert [a.keys() for a in two] == [b.keys() for b in one] and not differ, differ


def test_batches_are_shared_in_contiguous_runs_that_differ_by_at_most_one():
    batches = list(range(7))
    shares = [Ranks(rank, 3).share(batches) for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert Ranks().share(batches) == batches


def test_fewer_batches_than_ranks_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="2 calibration batches cannot be shared by 3 ranks.*smaller batch size"):
        Ranks(0, 3).share([0, 1])


class Counting(Accumulator):
    """A third-party accumulator whose state is a sum, not a mean: it cannot be combined."""

    def __init__(self) -> None:
        self.tokens, self.count = 0, torch.zeros(())

    def add(self, inputs, fp_inputs):
        self.tokens += inputs.shape[0]
        self.count += inputs.shape[0]

    def result(self):
        return self.count


class CountingStatistic(Statistic):
    def accumulator(self, columns, *, dtype, device):
        return Counting()


def test_an_accumulator_that_cannot_be_combined_stops_a_run_on_several_ranks_by_name():
    statistics = StatisticsAccumulator(4, frozenset({Statistic.HESSIAN, CountingStatistic("count")}))
    statistics.add(torch.ones(3, 4))
    with pytest.raises(NotCombinableError, match="test_distributed.Counting cannot be combined across ranks"):
        Ranks(1, 2).combine(statistics)  # refused before any collective: no process group is needed
    Ranks().combine(statistics)  # one process: nothing to combine
    assert statistics.result().tokens == 3
