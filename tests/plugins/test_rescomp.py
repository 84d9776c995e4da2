"""ResComp on single layers, on both bases: equal to the float64 reference of its equations in every
mode, and reducing from the GPTAQ base to the GPTQ base when the streams are equal."""
import pytest
import torch

from compquant import Grid, quantize_layer
from compquant.plugins.rescomp import ResCompOptions

F64 = dict(stats_dtype=torch.float64)
CARRY = {"org": "quantized", "allw": "clamped", "exact": "compensated"}


@pytest.mark.parametrize("base", ["gptaq", "gptq"])
@pytest.mark.parametrize(
    "options",
    [
        {"bits": 3, "group_size": 32, "blocksize": 32},  # auto: allw at 3 bits
        {"bits": 2, "group_size": 32, "blocksize": 32},  # auto: org at 2 bits
        {"bits": 3, "group_size": 16, "blocksize": 32, "mode": "org"},
        {"bits": 3, "group_size": 40, "blocksize": 32, "mode": "allw", "sym": True},
        {"bits": 3, "group_size": -1, "blocksize": 32, "mode": "exact"},
        {"bits": 4, "group_size": 32, "blocksize": 32, "act_order": True, "static_groups": True, "alpha2": 0.5},
        {"bits": 3, "group_size": 32, "blocksize": 32, "act_order": True, "clip": True, "sym": True},
    ],
)
def test_rescomp_equals_slow_float64_reference(asymmetric_layer, layer_statistics, reference, base, options):
    weight, inputs, fp_inputs = asymmetric_layer()
    options = dict(options)
    grid = Grid(bits=options.pop("bits"), sym=options.pop("sym", False), group_size=options.pop("group_size"),
                clip=options.pop("clip", False))
    result = quantize_layer(weight, inputs, solver="rescomp", fp_inputs=fp_inputs if base == "gptaq" else None,
                            bits=grid.bits, group_size=grid.group_size, sym=grid.sym, clip=grid.clip, base=base,
                            **F64, **options)
    mode = ResCompOptions(**{k: v for k, v in options.items() if k == "mode"}).resolved_mode(grid.bits)
    alpha2 = options.pop("alpha2", 0.25)
    options.pop("mode", None)
    hessian, cross = layer_statistics(inputs, fp_inputs)
    expected = reference(
        weight, hessian, grid, cross=cross if base == "gptaq" else None, alpha2=alpha2,
        fp_cross_input=hessian + cross if base == "gptaq" else hessian, carry=CARRY[mode], **options,
    )
    assert torch.equal(result.codes.double(), expected)


@pytest.mark.parametrize("mode", ["org", "allw", "exact"])
def test_rescomp_on_gptaq_with_equal_streams_is_rescomp_on_gptq(asymmetric_layer, mode):
    weight, inputs, _ = asymmetric_layer()
    kwargs = dict(bits=3, group_size=32, mode=mode, **F64)
    on_gptaq = quantize_layer(weight, inputs, solver="rescomp", fp_inputs=inputs, base="gptaq", **kwargs)
    on_gptq = quantize_layer(weight, inputs, solver="rescomp", base="gptq", **kwargs)
    assert torch.equal(on_gptaq.codes, on_gptq.codes)


def test_rescomp_without_its_term_is_its_base(asymmetric_layer):
    weight, inputs, fp_inputs = asymmetric_layer()
    kwargs = dict(bits=3, group_size=32, **F64)
    assert torch.equal(
        quantize_layer(weight, inputs, solver="rescomp", fp_inputs=fp_inputs, alpha2=0.0, mode="org", **kwargs).codes,
        quantize_layer(weight, inputs, solver="gptaq", fp_inputs=fp_inputs, **kwargs).codes,
    )
    assert torch.equal(
        quantize_layer(weight, inputs, solver="rescomp", base="gptq", alpha2=0.0, **kwargs).codes,
        quantize_layer(weight, inputs, solver="gptq", **kwargs).codes,
    )


def test_meaningless_combination_is_a_clear_error(asymmetric_layer):
    weight, inputs, _ = asymmetric_layer()
    with pytest.raises(ValueError, match="alpha.*base gptq"):
        quantize_layer(weight, inputs, solver="rescomp", base="gptq", alpha=0.5)


@pytest.mark.parametrize("base", ["gptaq", "gptq"])
def test_allw_with_fresh_grids_of_groups_wider_than_the_lazy_block(asymmetric_layer, layer_statistics, reference, base):
    """The first group opens a block before any column is frozen, so there is no grid to clamp to yet."""
    weight, inputs, fp_inputs = asymmetric_layer()
    options = dict(blocksize=32, group_timing="fresh")
    result = quantize_layer(weight, inputs, solver="rescomp", fp_inputs=fp_inputs if base == "gptaq" else None, bits=3,
                            group_size=64, base=base, mode="allw", **F64, **options)
    hessian, cross = layer_statistics(inputs, fp_inputs)
    expected = reference(weight, hessian, Grid(bits=3, group_size=64), cross=cross if base == "gptaq" else None, alpha2=0.25,
                         fp_cross_input=hessian + cross if base == "gptaq" else hessian, carry="clamped", **options)
    assert torch.equal(result.codes.double(), expected)
