"""GPTQ on single layers: against RTN, against the slow float64 reference of its equations, and on
the edge cases users hit (act_order, static groups, partial groups, dead inputs, non-PD Hessians)."""
import pytest
import torch

import compquant
from compquant import Grid, quantize_layer
from compquant.core.columns import NumericalWarning
from compquant.core.plugin_manager import registry_for


def output_error(weight, quantized, inputs):
    return float(((weight - quantized) @ inputs.T).pow(2).sum() / (weight @ inputs.T).pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits, group_size", [(4, -1), (3, 32), (2, 64)])
def test_gptq_beats_rtn_on_correlated_inputs(correlated_layer, seed, bits, group_size):
    weight, inputs = correlated_layer(seed=seed)
    rtn = quantize_layer(weight, inputs, solver="rtn", bits=bits, group_size=group_size)
    gptq = quantize_layer(weight, inputs, solver="gptq", bits=bits, group_size=group_size)
    assert output_error(weight, gptq.weight, inputs) < 0.8 * output_error(weight, rtn.weight, inputs)


@pytest.mark.parametrize(
    "options",
    [
        {"group_size": -1},
        {"group_size": 32},
        {"group_size": 48},  # does not divide 128 columns: a partial last group
        {"group_size": 32, "act_order": True},
        {"group_size": 32, "act_order": True, "static_groups": True},
        {"group_size": -1, "act_order": True, "sym": True},
    ],
)
@pytest.mark.parametrize("group_timing", ["block", "fresh"])
def test_gptq_equals_slow_float64_reference(correlated_layer, reference, options, group_timing):
    weight, inputs = correlated_layer(dtype=torch.float64)
    options = dict(options, blocksize=16)
    if not options.get("static_groups"):
        options["group_timing"] = group_timing
    grid = Grid(bits=3, sym=options.pop("sym", False), group_size=options.pop("group_size"))
    result = quantize_layer(
        weight, inputs, solver="gptq", bits=grid.bits, group_size=grid.group_size, sym=grid.sym,
        stats_dtype=torch.float64, **options,
    )
    hessian = 2 / inputs.shape[0] * inputs.T @ inputs
    expected = reference(weight, hessian, grid, **options)
    assert torch.equal(result.codes.double(), expected)


def test_lazy_blocks_do_not_change_the_result_without_groups(correlated_layer):
    weight, inputs = correlated_layer(dtype=torch.float64)
    results = [quantize_layer(weight, inputs, group_size=-1, blocksize=b, stats_dtype=torch.float64) for b in (1, 7, 128)]
    for other in results[1:]:
        assert torch.equal(results[0].codes, other.codes)


def test_block_timing_reads_group_grids_from_the_block_start(correlated_layer):
    """With groups smaller than the lazy block, the reference's stale grids differ from fresh ones;
    with aligned groups equal to the block size they coincide."""
    weight, inputs = correlated_layer(dtype=torch.float64)
    kwargs = dict(bits=3, group_size=32, stats_dtype=torch.float64)
    stale = quantize_layer(weight, inputs, blocksize=128, group_timing="block", **kwargs)
    fresh = quantize_layer(weight, inputs, blocksize=128, group_timing="fresh", **kwargs)
    aligned = quantize_layer(weight, inputs, blocksize=32, group_timing="block", **kwargs)
    assert not torch.equal(stale.codes, fresh.codes)
    assert torch.equal(aligned.codes, fresh.codes)


def test_gptq_is_bit_exact_deterministic(correlated_layer):
    weight, inputs = correlated_layer()
    first = quantize_layer(weight, inputs, bits=3, group_size=32, act_order=True)
    second = quantize_layer(weight, inputs, bits=3, group_size=32, act_order=True)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.codes, second.codes)


@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("group_size", [-1, 32, 40, 128, 200])
def test_result_is_its_codes_on_its_grids(correlated_layer, act_order, static_groups, group_size):
    weight, inputs = correlated_layer()
    result = quantize_layer(weight, inputs, bits=4, group_size=group_size, act_order=act_order, static_groups=static_groups)
    groups = 1 if group_size == -1 else -(-weight.shape[1] // group_size)
    assert result.scale.shape == result.zero.shape == (weight.shape[0], groups)
    rebuilt = result.scale[:, result.g_idx] * (result.codes - result.zero[:, result.g_idx])
    torch.testing.assert_close(rebuilt, result.weight)
    if group_size != -1 and not (act_order and not static_groups):
        assert torch.equal(result.g_idx, torch.arange(weight.shape[1]) // group_size)
    if act_order and not static_groups and group_size == 32:
        # dynamic groups are contiguous in act-order: group k holds the k-th 32 columns of perm
        assert torch.equal(result.g_idx[result.perm], torch.arange(weight.shape[1]) // 32)


def test_dead_input_columns_are_zeroed_and_do_not_break_the_solve(correlated_layer):
    weight, inputs = correlated_layer()
    inputs[:, [3, 70]] = 0
    result = quantize_layer(weight, inputs, bits=3, group_size=32, act_order=True)
    assert torch.isfinite(result.weight).all()
    assert torch.all(result.weight[:, [3, 70]] == 0)


def test_non_positive_definite_hessian_gets_more_damping_not_a_crash():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=generator)
    hessian = torch.randn(32, 32, generator=generator)
    hessian = hessian @ hessian.T
    hessian -= 1.5 * torch.linalg.eigvalsh(hessian)[0].abs() * torch.eye(32) + 1.0 * torch.eye(32)
    from compquant.plugins.gptq import GPTQ

    gptq = GPTQ()
    stats = compquant.LayerStatistics(hessian, None, 100)
    with pytest.warns(NumericalWarning, match="not positive definite"):
        result = gptq.solve(weight, stats, Grid(bits=4, group_size=-1), gptq.options({"percdamp": 0.0}))
    assert torch.isfinite(result.weight).all()


def test_unknown_solver_option_is_a_clear_error(correlated_layer):
    weight, inputs = correlated_layer()
    with pytest.raises(ValueError, match="blocksiz"):
        quantize_layer(weight, inputs, blocksiz=64)


def test_static_groups_with_a_group_timing_is_a_clear_error(correlated_layer):
    weight, inputs = correlated_layer()
    with pytest.raises(ValueError, match="static_groups.*group_timing"):
        quantize_layer(weight, inputs, static_groups=True, group_timing="fresh")


@pytest.mark.parametrize("act_order", [False, True])
def test_on_learned_ranges_every_group_keeps_its_learned_grid_in_column_order(correlated_layer, act_order):
    weight, inputs = correlated_layer()
    grid = Grid(bits=3, group_size=32)
    own = grid.group_ranges(weight)
    ranges = compquant.GroupRanges(own.lo * 0.7, own.hi * 0.8)
    stats = compquant.LayerStatistics(2 / inputs.shape[0] * inputs.T @ inputs, None, inputs.shape[0])
    solver = registry_for(None).get("solver", "gptq")
    result = solver.solve(weight, stats, grid.with_ranges(ranges), solver.options({"act_order": act_order}))
    expected = grid.params_from_range(ranges.lo, ranges.hi)
    assert torch.equal(result.scale, expected.scale) and torch.equal(result.zero, expected.zero)
    assert torch.equal(result.g_idx, torch.arange(weight.shape[1]) // 32)
