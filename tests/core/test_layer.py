import pytest
import torch

from compquant import quantize_layer


def test_quantize_layer_returns_codes_grids_and_weight(correlated_layer):
    weight, inputs = correlated_layer(rows=16, columns=96)
    result = quantize_layer(weight, inputs, solver="gptq", bits=4, group_size=64, sym=True, clip=True, act_order=True)
    assert result.weight.shape == result.codes.shape == weight.shape
    assert result.scale.shape == result.zero.shape == (16, 2)
    assert result.codes.min() >= -8 and result.codes.max() <= 7
    assert torch.all(result.zero == 0)


def test_quantize_layer_runs_in_the_statistics_dtype(correlated_layer):
    weight, inputs = correlated_layer(rows=8, columns=32)
    result = quantize_layer(weight.double(), inputs.double(), stats_dtype=torch.float64, group_size=-1)
    assert result.weight.dtype == torch.float64 and result.scale.dtype == torch.float64


def test_quantize_layer_without_inputs_for_gptq_is_a_clear_error(correlated_layer):
    weight, _ = correlated_layer(rows=8, columns=32)
    with pytest.raises(ValueError, match="needs calibration inputs"):
        quantize_layer(weight, None, solver="gptq")
