import pytest
import torch

import compquant
from compquant import Grid


def test_quarot_symmetric_grid_is_signed_with_absmax_scale():
    grid = Grid(bits=4, sym=True, group_size=-1)
    w = torch.tensor([[-1.4, 0.2, 0.7], [0.5, 0.25, 0.0]])
    params = grid.find_params(w)
    assert grid.code_range == (-8, 7)
    torch.testing.assert_close(params.scale, torch.tensor([1.4 / 7, 0.5 / 7]))
    assert torch.all(params.zero == 0)
    codes = grid.quantize(w, params)
    assert codes.min() >= -8 and codes.max() <= 7
    assert codes[0, 0] == -7  # -absmax lands on -qmax; -8 stays reachable for larger negatives


def test_asymmetric_grid_covers_min_to_max_including_zero():
    grid = Grid(bits=3, sym=False, group_size=-1)
    w = torch.tensor([[0.5, 1.0, 2.0, 3.5]])  # all positive: range still starts at 0
    params = grid.find_params(w)
    torch.testing.assert_close(params.scale, torch.tensor([3.5 / 7]))
    assert params.zero.item() == 0
    assert grid.fake_quantize(w, params)[0, -1].item() == pytest.approx(3.5)


def test_all_zero_row_gets_a_finite_grid_and_stays_zero():
    for grid in (Grid(bits=4, sym=False, group_size=-1), Grid(bits=4, sym=True, group_size=-1, convention="ist")):
        w = torch.zeros(2, 8)
        params = grid.find_params(w)
        assert torch.isfinite(params.scale).all() and (params.scale > 0).all()
        assert torch.equal(grid.fake_quantize(w, params), w)


def test_ist_symmetric_grid_is_unsigned_with_mid_zero():
    grid = Grid(bits=4, sym=True, group_size=-1, convention="ist")
    w = torch.tensor([[-1.5, 0.3, 1.0]])
    params = grid.find_params(w)
    assert grid.code_range == (0, 15)
    assert params.zero.item() == 8
    torch.testing.assert_close(params.scale, torch.tensor([3.0 / 15]))
    assert grid.quantize(w, params).min() >= 0


def test_clip_search_never_increases_the_clipping_objective():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=generator)
    w[:, 0] *= 20  # an outlier column makes the min/max grid wasteful
    for sym in (False, True):
        plain, clipped = Grid(bits=3, sym=sym, group_size=-1), Grid(bits=3, sym=sym, group_size=-1, clip=True)

        def objective(grid: Grid) -> torch.Tensor:
            return (grid.fake_quantize(w, grid.find_params(w)) - w).abs().pow(2.4).sum(dim=1)

        assert torch.all(objective(clipped) <= objective(plain) + 1e-5)
        assert objective(clipped).sum() < objective(plain).sum()


def test_representable_range_matches_extreme_codes():
    grid = Grid(bits=2, sym=False, group_size=-1)
    w = torch.tensor([[-0.3, 0.9]])
    params = grid.find_params(w)
    low, high = grid.representable_range(params)
    codes = torch.tensor([[0.0, 3.0]])
    torch.testing.assert_close(grid.dequantize(codes, params), torch.stack([low, high], dim=1))


@pytest.mark.parametrize("kwargs, message", [({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"group_size": 0}, "group_size"),
                                              ({"group_size": -2}, "group_size")])
def test_invalid_grid_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Grid(**kwargs)


def test_group_starts_include_a_partial_last_group():
    assert list(Grid(group_size=128).group_starts(576)) == [0, 128, 256, 384, 512]
    assert list(Grid(group_size=-1).group_starts(576)) == [0]


def test_learned_ranges_replace_each_groups_own_interval():
    grid = Grid(bits=3, group_size=4)
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    own = grid.group_ranges(w)
    assert own.lo.shape == own.hi.shape == (3, 3)  # the partial last group counts
    learned = grid.with_ranges(compquant.GroupRanges(own.lo / 2, own.hi / 2))
    for group, start in enumerate(grid.group_starts(10)):
        expected = grid.params_from_range(own.lo[:, group] / 2, own.hi[:, group] / 2)
        params = learned.find_params(w[:, start:start + 4], group=group)
        assert torch.equal(params.scale, expected.scale) and torch.equal(params.zero, expected.zero)
        assert torch.equal(grid.find_params(w[:, start:start + 4]).scale, grid.params_from_range(
            own.lo[:, group], own.hi[:, group]).scale)
    assert learned == grid  # the ranges belong to one linear, not to the grid's settings
