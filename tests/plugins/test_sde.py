"""LSI and SDE (docs/learners.md §2-3), and cross-layer learning (§4): their equations against the
slow reference, SDE with band 0 is LSI, and CQE+ runs with GPTQ as the final step."""
import pytest
import torch

import compquant
from compquant import Grid, QuantConfig
from compquant.plugins.sde import LSI, SDE, SingularValueExpansion


@pytest.mark.parametrize("learner, options, reference", [
    (LSI(), {}, {"band": 0}),
    (SDE(), {"band": 1}, {"band": 1}),
    (SDE(), {"band": 2, "rank": 10, "penalty": 1e-3}, {"band": 2, "rank": 10, "penalty": 1e-3}),
    (SDE(), {"band": 1, "lookahead": 1, "lambda_cl": 0.5}, {"band": 1, "lambda_cl": 0.5, "following": 1}),
])
def test_each_follows_its_equations(tiny_task, learner_reference, learner, options, reference):
    grid = Grid(bits=3, group_size=8)
    following = reference.pop("following", 0)
    task = tiny_task(grid, following=following)
    learned = learner.learn(task, learner.options({"epochs": 3, "lr": 5e-2, "sv_lr": 2e-2, **options}))
    losses, weights, ranges = learner_reference(tiny_task(grid, following=following), epochs=3, lr=5e-2, sv_lr=2e-2,
                                                **reference)
    torch.testing.assert_close(torch.tensor(learned.losses), torch.tensor(losses), rtol=1e-9, atol=0)
    for name, (lo, hi) in ranges.items():
        torch.testing.assert_close(task.linears[name].weight, weights[name], rtol=0, atol=1e-12)
        torch.testing.assert_close(learned.ranges[name].lo, lo, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(learned.ranges[name].hi, hi, rtol=1e-9, atol=1e-12)


def test_the_expansion_starts_at_the_weight_and_stays_on_its_band():
    weight = torch.randn(12, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expansion = SingularValueExpansion(weight, Grid(bits=3, group_size=8), band=1, rank=6)
    assert torch.equal(expansion.weight(), weight)  # E = 0 is W itself, not W rebuilt from its SVD
    assert [values.shape[0] for values in [expansion.diagonal, *expansion.bands]] == [6, 5, 5]
    with torch.no_grad():
        for values in [expansion.diagonal, *expansion.bands]:
            values.normal_(generator=torch.Generator().manual_seed(1))
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    core = torch.diag(sigma)
    core[:6, :6] += torch.diag(expansion.diagonal) + expansion.expansion()
    torch.testing.assert_close(expansion.weight(), u @ core @ vh)
    band = expansion.expansion()
    assert torch.count_nonzero(torch.triu(band, 2)) == torch.count_nonzero(torch.tril(band, -2)) == 0


def test_sde_with_band_zero_is_lsi_exactly(make_llama, token_batches):
    calibration = token_batches(4, 16)
    options = {"epochs": 2, "lr": 5e-2, "sv_lr": 1e-2}
    models, reports = [], []
    for learner, extra in (("lsi", {}), ("sde", {"band": 0})):
        model = make_llama()
        config = QuantConfig(solver="rtn", learner=learner, learner_options={**options, **extra},
                             grid={"bits": 3, "group_size": 32})
        reports.append(compquant.quantize(model, config, calibration=calibration))
        models.append(model)
    assert [block.losses for block in reports[0].blocks] == [block.losses for block in reports[1].blocks]
    for (name, lsi), sde in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(lsi, sde), name


def test_cqe_plus_is_sde_with_cross_layer_learning_and_gptq_as_the_final_step(make_llama, token_batches):
    calibration = token_batches(4, 16)
    config = QuantConfig(solver="gptq", learner="sde", grid={"bits": 3, "group_size": 32},
                         learner_options={"epochs": 2, "lr": 5e-2, "sv_lr": 1e-2, "lookahead": 1})
    model = make_llama()
    report = compquant.quantize(model, config, calibration=calibration)
    assert [layer.solver for layer in report.layers] == ["gptq"] * 14
    assert all(layer.relative_error is not None for layer in report.layers)
    without = make_llama()
    compquant.quantize(without, config.model_copy(update={"learner_options": {**config.learner_options, "lookahead": 0}}),
                       calibration=calibration)
    # block 0 looked ahead through block 1, so it learned something else than without the look-ahead
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, without.model.layers[0].mlp.down_proj.weight)
    assert len(report.blocks) == 2 and all(len(block.losses) == 2 for block in report.blocks)
