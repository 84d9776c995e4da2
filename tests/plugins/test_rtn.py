import torch

from compquant import Grid, quantize_layer


def test_rtn_rounds_each_group_to_its_own_grid():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 100, generator=generator)
    result = quantize_layer(weight, None, solver="rtn", bits=4, group_size=32)
    grid = Grid(bits=4, group_size=32)
    for index, start in enumerate(range(0, 100, 32)):
        columns = slice(start, start + 32)
        params = grid.find_params(weight[:, columns])
        torch.testing.assert_close(result.weight[:, columns], grid.fake_quantize(weight[:, columns], params))
        torch.testing.assert_close(result.scale[:, index], params.scale)
    assert result.scale.shape == (8, 4)  # 100 columns: three full groups and a partial one


def test_rtn_needs_no_calibration_inputs():
    weight = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    assert quantize_layer(weight, None, solver="rtn", group_size=-1).codes.dtype == torch.int16
