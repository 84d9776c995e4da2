"""GPTAQ on single layers: equal to the float64 reference of its equations, reducing to GPTQ when
the full-precision inputs equal the quantized ones, and better at its own objective than GPTQ."""
import pytest
import torch

from compquant import Grid, quantize_layer

F64 = dict(stats_dtype=torch.float64)


@pytest.mark.parametrize(
    "options",
    [
        {"group_size": -1, "blocksize": 32},
        {"group_size": 32, "blocksize": 32},
        {"group_size": 16, "blocksize": 32},  # groups inside a lazy block: grids from the block start
        {"group_size": 40, "blocksize": 32},  # groups straddling blocks, a partial last group
        {"group_size": 32, "blocksize": 32, "act_order": True},
        {"group_size": 32, "blocksize": 32, "act_order": True, "static_groups": True},
        {"group_size": -1, "blocksize": 32, "sym": True, "clip": True},
        {"group_size": 32, "blocksize": 32, "cross_block": "exact"},
        {"group_size": 32, "blocksize": 32, "alpha": 1.0},
    ],
)
def test_gptaq_equals_slow_float64_reference(asymmetric_layer, layer_statistics, reference, options):
    weight, inputs, fp_inputs = asymmetric_layer()
    options = dict(options)
    grid = Grid(bits=3, sym=options.pop("sym", False), group_size=options.pop("group_size"), clip=options.pop("clip", False))
    result = quantize_layer(weight, inputs, solver="gptaq", fp_inputs=fp_inputs, bits=grid.bits, group_size=grid.group_size,
                            sym=grid.sym, clip=grid.clip, **F64, **options)
    hessian, cross = layer_statistics(inputs, fp_inputs)
    carry = "compensated" if options.pop("cross_block", "released") == "exact" else "quantized"
    expected = reference(weight, hessian, grid, cross=cross, carry=carry, **options)
    assert torch.equal(result.codes.double(), expected)


def test_gptaq_with_equal_streams_is_gptq(asymmetric_layer):
    weight, inputs, _ = asymmetric_layer()
    kwargs = dict(bits=3, group_size=32, act_order=True, **F64)
    gptaq = quantize_layer(weight, inputs, solver="gptaq", fp_inputs=inputs, **kwargs)
    gptq = quantize_layer(weight, inputs, solver="gptq", **kwargs)
    assert torch.equal(gptaq.codes, gptq.codes) and torch.equal(gptaq.weight, gptq.weight)


def asymmetric_error(weight, quantized, inputs, fp_inputs):
    return float((quantized @ inputs.T - weight @ fp_inputs.T).pow(2).sum())


def test_gptaq_lowers_its_objective_against_gptq(asymmetric_layer):
    """‖QX − WX̃‖² over 12 seeds: GPTAQ below GPTQ on average, by more than the seed-to-seed spread
    of the difference allows by chance (a one-sided t statistic above 3)."""
    differences = []
    for seed in range(12):
        weight, inputs, fp_inputs = asymmetric_layer(seed=seed, columns=64, tokens=512)
        kwargs = dict(bits=3, group_size=-1, **F64)
        gptq = quantize_layer(weight, inputs, solver="gptq", **kwargs)
        gptaq = quantize_layer(weight, inputs, solver="gptaq", fp_inputs=fp_inputs, **kwargs)
        reference_error = asymmetric_error(weight, gptq.weight, inputs, fp_inputs)
        differences.append((reference_error - asymmetric_error(weight, gptaq.weight, inputs, fp_inputs)) / reference_error)
    d = torch.tensor(differences)
    assert d.mean() > 0
    assert d.mean() / (d.std() / len(d) ** 0.5) > 3


def test_gptaq_without_fp_inputs_says_so(asymmetric_layer):
    weight, inputs, _ = asymmetric_layer()
    with pytest.raises(ValueError, match="fp_inputs"):
        quantize_layer(weight, inputs, solver="gptaq")
