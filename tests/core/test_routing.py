"""Routed linears in the calibration loop, on a toy block whose router sends each token to one of two
experts through the two calls of `compquant.core.routing`: no transformers model, no MoE adapter."""
import copy
import logging

import pytest
import torch
from torch import nn

import compquant
from compquant import ArchitectureAdapter
from compquant.core.calibration import Activations, CalibrationPlan, quantize_block
from compquant.core.config import GridConfig
from compquant.core.plugin_manager import registry_for
from compquant.core.routing import feeds_every_token, routed_to

WIDTH = 16


class ToyExperts(nn.Module):
    """Each token goes to the expert its router scores highest; the expert's output is added to it."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(WIDTH, 2, bias=False)
        self.experts = nn.ModuleList([nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(2)])

    def forward(self, hidden):
        flat = hidden.reshape(-1, WIDTH)
        choice = self.router(flat).argmax(-1)
        output = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            token = (choice == index).nonzero()[:, 0]
            if feeds_every_token():
                with routed_to(torch.zeros(len(flat), dtype=torch.bool).index_fill_(0, token, True)):
                    result = expert(flat)[token]
            else:
                result = expert(flat[token])
            output.index_add_(0, token, result)
        return (hidden + output.reshape(hidden.shape),)


def plan(**fields):
    solver = registry_for(None).get("solver", "gptq")
    adapter = ArchitectureAdapter(name="toy", model_types=(), blocks="", groups=(("experts.0",), ("experts.1",)))
    return CalibrationPlan(adapter, "gptq", solver, solver.options({}), GridConfig(bits=3, group_size=WIDTH).grid(),
                           torch.device("cpu"), stats_dtype=torch.float64, **fields)


def run(block, hidden, calibration_plan):
    reports = {}
    outputs = quantize_block(block, Activations(hidden, [{}] * len(hidden)), calibration_plan, "toy",
                             lambda layer, report, result: reports.update({report.name: (report, result)}))
    return outputs, reports


@pytest.fixture
def toy():
    torch.manual_seed(0)
    block = ToyExperts().double()
    with torch.no_grad():
        block.router.weight.mul_(3)
    hidden = [torch.randn(2, 40, WIDTH, dtype=torch.float64) for _ in range(3)]  # 3 batches, routed differently
    return block, hidden


@pytest.mark.parametrize("sequential", ["groups", "blocks"])
def test_each_expert_is_calibrated_on_its_routed_rows_of_every_batch(toy, sequential):
    block, hidden = toy
    original = copy.deepcopy(block)
    outputs, reports = run(block, hidden, plan(sequential=sequential))
    flat = torch.cat([h.reshape(-1, WIDTH) for h in hidden])
    choice = original.router(flat).argmax(-1)
    for index in range(2):
        routed = flat[choice == index]
        report, result = reports[f"toy.experts.{index}"]
        expected = compquant.quantize_layer(original.experts[index].weight.data, routed, solver="gptq", bits=3,
                                            group_size=WIDTH, stats_dtype=torch.float64)
        assert result.codes.equal(expected.codes)
        assert report.routed_tokens == report.tokens == routed.shape[0] and report.fallback is None
    with torch.no_grad():  # what is handed on is the quantized block's output, routed as at inference
        torch.testing.assert_close(outputs.hidden, [block(h)[0] for h in hidden], rtol=0, atol=1e-12)


@pytest.mark.parametrize("sequential", ["groups", "blocks"])
def test_too_few_routed_rows_fall_back_to_every_row(toy, caplog, sequential):
    block, hidden = toy
    original = copy.deepcopy(block)
    with caplog.at_level(logging.WARNING, logger="compquant.core.calibration"):
        _, reports = run(block, hidden, plan(routed_min_tokens=10_000, sequential=sequential))
    flat = torch.cat([h.reshape(-1, WIDTH) for h in hidden])
    report, result = reports["toy.experts.1"]
    expected = compquant.quantize_layer(original.experts[1].weight.data, flat, solver="gptq", bits=3,
                                        group_size=WIDTH, stats_dtype=torch.float64)
    assert result.codes.equal(expected.codes)
    assert report.fallback == "all-tokens" and report.tokens == flat.shape[0] > report.routed_tokens
    assert f"toy.experts.1 received {report.routed_tokens} routed calibration tokens, fewer than 10000" in caplog.text


def test_outside_the_loop_routing_modules_route_as_usual(toy):
    block, hidden = toy
    seen = []
    block.experts[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        block(hidden[0])
    assert 0 < seen[0] < hidden[0].shape[0] * hidden[0].shape[1]
