"""The same code path on CUDA (skipped on machines without one)."""
import pytest
import torch

import compquant
from compquant import QuantConfig

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_calibration_matches_cpu(make_llama, token_batches):
    calibration = token_batches(4, 16)
    results = {}
    for device in ("cpu", "cuda"):
        model = make_llama()
        config = QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32}, device=device, stats_dtype="float64")
        compquant.quantize(model, config, calibration=calibration)
        assert next(model.parameters()).device.type == "cpu"  # blocks go back where they came from
        results[device] = model.model.layers[1].mlp.down_proj.weight
    mismatched = (results["cpu"] != results["cuda"]).float().mean().item()
    assert mismatched < 0.01  # float64 on both: only rare rounding ties may differ


def test_cuda_layer_solve_runs_on_the_device(correlated_layer):
    weight, inputs = correlated_layer()
    result = compquant.quantize_layer(weight.cuda(), inputs.cuda(), bits=3, group_size=32, act_order=True)
    assert result.weight.device.type == "cuda" and torch.isfinite(result.weight).all()


def test_cuda_learning_with_a_look_ahead_runs_on_the_device_and_hands_the_blocks_back(make_llama, token_batches):
    model = make_llama()
    config = QuantConfig(solver="gptq", learner="sde", grid={"bits": 3, "group_size": 32}, device="cuda",
                         learner_options={"epochs": 2, "lookahead": 1})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16))
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}  # look-ahead blocks too
    assert [len(block.losses) for block in report.blocks] == [2, 2]
    assert all(torch.isfinite(record.scale).all() for record in report.records.values())
