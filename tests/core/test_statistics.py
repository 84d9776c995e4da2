import copy

import pytest
import torch

import compquant
from compquant import QuantConfig, Statistic
from compquant.core.plugin_manager import create_plugin_manager
from compquant.core.statistics import Accumulator, NonFiniteStatisticsError, StatisticsAccumulator
from compquant.plugins.rtn import round_to_nearest


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


class FullPrecisionMean(Statistic):
    """The mean of the full-precision inputs X̃: a statistic the core does not know."""

    def __init__(self):
        super().__init__("fp_mean", needs_fp_inputs=True)

    def accumulator(self, columns, *, dtype, device):
        return RunningMean(columns, dtype, device)


class RunningMean(Accumulator):
    def __init__(self, columns, dtype, device):
        self.value = torch.zeros(columns, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, inputs, fp_inputs):
        total = self.tokens + fp_inputs.shape[0]
        self.value.mul_(self.tokens / total).add_(fp_inputs.sum(dim=0), alpha=1 / total)
        self.tokens = total

    def result(self):
        return self.value


FP_MEAN = FullPrecisionMean()


class MeanRecordingRTN(compquant.Solver):
    """Asks for nothing but `FP_MEAN`, records what it is given and rounds to nearest."""

    rows_independent = True

    def __init__(self):
        self.means = []

    def statistics(self, options):
        return frozenset({FP_MEAN})

    def solve(self, weight, stats, grid, options):
        self.means.append(stats[FP_MEAN].clone())
        return round_to_nearest(weight, grid)

    @compquant.hookimpl
    def compquant_register_solvers(self, register):
        """The solver is its own plugin."""
        register("mean-recording-rtn", self)


def test_every_statistic_is_read_by_the_statistic():
    generator = torch.Generator().manual_seed(0)
    x, fp = torch.randn(2, 50, 8, generator=generator, dtype=torch.float64)
    accumulator = StatisticsAccumulator(8, frozenset({Statistic.HESSIAN, FP_MEAN}), dtype=torch.float64)
    accumulator.add(x[:20], fp[:20])
    accumulator.add(x[20:], fp[20:])
    stats = accumulator.result()
    assert stats[Statistic.HESSIAN] is stats.hessian
    torch.testing.assert_close(stats[FP_MEAN], fp.mean(dim=0))
    with pytest.raises(KeyError, match="cross.*statistics"):
        stats[Statistic.CROSS]


def test_a_statistic_a_solver_brings_reaches_its_solve(make_llama, token_batches):
    """The solver's own statistic needs X̃, so the loop runs the full-precision stream for it alone;
    every group gets the mean of its full-precision inputs, not of the quantized path's."""
    model = make_llama()
    original = copy.deepcopy(model)
    calibration = token_batches(6, 24)
    solver = MeanRecordingRTN()
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(solver)
    config = QuantConfig(solver="mean-recording-rtn", grid={"bits": 3, "group_size": 32}, stats_dtype="float64",
                         calibration={"batch_size": 4})
    report = compquant.quantize(model, config, calibration=calibration, plugin_manager=pm)
    firsts = [layer.name for layer in report.layers if layer.name.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))]
    assert len(solver.means) == len(firsts) == 8  # one stacked solve per group
    assert all(layer.relative_error is None for layer in report.layers)  # no H was asked for
    full_precision, quantized = input_means(original, calibration, firsts), input_means(model, calibration, firsts)
    for name, mean in zip(firsts, solver.means):
        torch.testing.assert_close(mean, full_precision[name], rtol=1e-6, atol=1e-8, msg=name)
    later = firsts[-1]
    assert not torch.allclose(full_precision[later], quantized[later], rtol=1e-3, atol=1e-5)


def input_means(model, calibration, names):
    seen = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0]))
               for name in names]
    with torch.no_grad():
        model(calibration, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(tensors).reshape(-1, tensors[0].shape[-1]).double().mean(dim=0) for name, tensors in seen.items()}
