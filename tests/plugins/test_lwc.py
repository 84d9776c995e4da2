"""LWC, OmniQuant's learnable weight clipping (docs/learners.md §1): its equations against the slow
reference, and what it buys over rounding to nearest on the same grid."""
import pytest
import torch

import compquant
from compquant import Grid, LearnerOptions, QuantConfig
from compquant.plugins.lwc import LWC, LearnedClipping
from compquant.plugins.rtn import round_to_nearest


def test_lwc_follows_its_equations(tiny_task, learner_reference):
    grid = Grid(bits=3, group_size=8)
    learned = LWC().learn(task := tiny_task(grid), LearnerOptions(epochs=3, lr=5e-2))
    losses, weights, ranges = learner_reference(tiny_task(grid), epochs=3, lr=5e-2)
    torch.testing.assert_close(torch.tensor(learned.losses), torch.tensor(losses), rtol=1e-9, atol=0)
    assert learned.losses[-1] < learned.losses[0]
    for name, (lo, hi) in ranges.items():
        assert torch.equal(task.linears[name].weight, weights[name])  # LWC leaves the weights as they are
        torch.testing.assert_close(learned.ranges[name].lo, lo, rtol=1e-9, atol=0)
        torch.testing.assert_close(learned.ranges[name].hi, hi, rtol=1e-9, atol=0)


@pytest.mark.parametrize("sym, convention", [(True, "quarot"), (True, "ist"), (False, "quarot")])
def test_a_symmetric_grid_learns_one_factor_on_both_ends(sym, convention):
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    grid = Grid(bits=3, group_size=8, sym=sym, convention=convention)
    clipping = LearnedClipping(weight, grid)
    with torch.no_grad():
        clipping.upper.fill_(0.0)  # sigmoid(0) = 1/2
    own, learned = grid.group_ranges(weight), clipping.ranges(weight)
    assert (clipping.lower is None) == sym
    torch.testing.assert_close(learned.hi, own.hi / 2)
    torch.testing.assert_close(learned.lo, own.lo / 2 if sym else own.lo * torch.sigmoid(torch.tensor(4.0)))


def test_lwc_then_rtn_reconstructs_the_block_better_than_rtn_on_the_same_grid(make_llama, token_batches,
                                                                                  block_error):
    calibration = token_batches(8, 16)
    grid = {"bits": 3, "group_size": 32}
    rtn, lwc = make_llama(), make_llama()
    compquant.quantize(rtn, QuantConfig(solver="rtn", grid=grid))
    # sigmoid(4) moves slowly: a step per window and a large rate, for a test that takes a second
    config = QuantConfig(solver="rtn", learner="lwc", grid=grid, calibration={"batch_size": 1},
                         learner_options={"epochs": 6, "lr": 0.2})
    report = compquant.quantize(lwc, config, calibration=calibration)
    assert [block.name for block in report.blocks] == ["model.layers.0", "model.layers.1"]
    assert all(block.losses[-1] < block.losses[0] for block in report.blocks)
    assert block_error(lwc, make_llama(), calibration.split(4)) < 0.9 * block_error(rtn, make_llama(),
                                                                                     calibration.split(4))


def test_rtn_after_lwc_is_the_block_it_trained_and_its_ranges_are_the_records(make_llama, token_batches):
    seen = {}

    class Recording(LWC):
        def learn(self, task, options):
            seen[task.name] = learned = super().learn(task, options)
            return learned

    pm = compquant.create_plugin_manager()

    class Plugin:
        @compquant.hookimpl
        def compquant_register_learners(self, register):
            register("recording-lwc", Recording())

    pm.register(Plugin())
    model = make_llama()
    config = QuantConfig(solver="rtn", learner="recording-lwc", grid={"bits": 3, "group_size": 32},
                         learner_options={"epochs": 2, "lr": 5e-2})
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = compquant.quantize(model, config, calibration=token_batches(4, 16), plugin_manager=pm)
    grid = config.grid.grid()
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        ranges = seen["model.layers.1"].ranges[name]
        record = report.records[f"model.layers.1.{name}"]
        params = grid.params_from_range(ranges.lo, ranges.hi)
        assert torch.equal(record.scale, params.scale) and torch.equal(record.zero.float(), params.zero)
        weight = original[f"model.layers.1.{name}.weight"]
        rtn = round_to_nearest(weight, grid)
        assert not torch.equal(record.scale, rtn.scale)  # the learned clipping, not the weights' own range
        learned = round_to_nearest(weight, grid.with_ranges(ranges))
        assert torch.equal(model.get_submodule(f"model.layers.1.{name}").weight, learned.weight)


@pytest.mark.parametrize("format", ["compressed-tensors", "gptq", "gptq-v2", "fake"])
def test_the_learned_grids_are_what_every_format_writes(make_llama, tiny_tokenizer, token_batches, tmp_path, format):
    from safetensors.torch import load_file

    model = make_llama()
    config = QuantConfig(solver="gptq", learner="lwc", grid={"bits": 4, "group_size": 32},
                         learner_options={"epochs": 1, "lr": 5e-2})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16))
    output = compquant.save_quantized(model, tiny_tokenizer, tmp_path / format, config=config, report=report,
                                      format=format, dtype=torch.float32)
    if format == "gptq":
        scales = load_file(output / "model.safetensors")["model.layers.1.mlp.up_proj.scales"]
        assert torch.equal(scales, report.records["model.layers.1.mlp.up_proj"].scale.T)
    reloaded = compquant.load_model(str(output)).model
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
