import pytest
import torch

from compquant import Statistic
from compquant.core.statistics import NonFiniteStatisticsError, StatisticsAccumulator


def test_running_mean_equals_one_shot_statistics():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=generator, dtype=torch.float64)
    fp = x + 0.1 * torch.randn(300, 16, generator=generator, dtype=torch.float64)
    accumulator = StatisticsAccumulator(16, frozenset({Statistic.HESSIAN, Statistic.CROSS}), dtype=torch.float64)
    for lo, hi in ((0, 7), (7, 100), (100, 300)):
        accumulator.add(x[lo:hi].reshape(1, hi - lo, 16), fp[lo:hi])
    stats = accumulator.result()
    torch.testing.assert_close(stats.hessian, 2 / 300 * x.T @ x)
    torch.testing.assert_close(stats.cross, 2 / 300 * (fp - x).T @ x)
    assert stats.tokens == 300


def test_cross_term_is_only_collected_when_asked():
    accumulator = StatisticsAccumulator(4, frozenset({Statistic.HESSIAN}))
    accumulator.add(torch.ones(3, 4))
    assert accumulator.result().cross is None


def test_cross_term_without_full_precision_inputs_is_an_error():
    accumulator = StatisticsAccumulator(4, frozenset({Statistic.HESSIAN, Statistic.CROSS}))
    with pytest.raises(ValueError, match="fp_inputs"):
        accumulator.add(torch.ones(3, 4))


def test_non_finite_inputs_are_refused():
    accumulator = StatisticsAccumulator(4, frozenset({Statistic.HESSIAN}))
    accumulator.add(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]))
    with pytest.raises(NonFiniteStatisticsError, match="NaN"):
        accumulator.result()
