"""The learner kind in the calibration loop (docs/learners.md): the training forward is RTN's, the
look-ahead blocks are the following full-precision ones, and a learner composes with resume,
low-memory mode, the full-precision stream of GPTAQ, the rotations and progress."""
import logging
import re

import pytest
import torch

import compquant
from compquant import Grid, GroupRanges, QuantConfig
from compquant.core.learner import fake_quantize
from compquant.core.low_memory import quantize_low_memory
from compquant.core.pipeline import check_plugins
from compquant.core.plugin_manager import create_plugin_manager, registry_for
from compquant.plugins.lwc import LWC
from compquant.plugins.rtn import round_to_nearest

LWC_CONFIG = {"solver": "rtn", "learner": "lwc", "grid": {"bits": 3, "group_size": 32},
              "learner_options": {"epochs": 2, "lr": 5e-2, "lookahead": 1}}


@pytest.mark.parametrize("grid", [Grid(bits=3, group_size=16), Grid(bits=2, group_size=24), Grid(bits=3, group_size=-1),
                                  Grid(bits=4, group_size=16, sym=True), Grid(bits=3, group_size=16, sym=True,
                                                                                convention="ist")])
def test_the_training_forward_is_round_to_nearest_on_the_learned_ranges(grid):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 40, generator=generator)
    own = grid.group_ranges(weight)
    shrink = torch.rand(own.lo.shape, generator=generator) * 0.5 + 0.5
    ranges = GroupRanges(own.lo * shrink, own.hi * (shrink if grid.sym else shrink.flip(0)))
    assert torch.equal(fake_quantize(weight, grid), round_to_nearest(weight, grid).weight)
    assert torch.equal(fake_quantize(weight, grid, ranges), round_to_nearest(weight, grid.with_ranges(ranges)).weight)
    weight.requires_grad_(True)
    fake_quantize(weight, grid, ranges).sum().backward()
    assert torch.count_nonzero(weight.grad) > 0  # rounding passes the gradient straight through (clamped ends: 0)


def test_a_solver_must_say_which_group_it_quantizes_on_learned_ranges():
    grid = Grid(bits=3, group_size=8)
    weight = torch.randn(4, 16)
    with pytest.raises(ValueError, match="must say which group"):
        grid.with_ranges(grid.group_ranges(weight)).find_params(weight[:, :8])


@pytest.mark.parametrize("config, expected", [
    ({"learner": "lwc", "learner_options": {"epoch": 3}},
     "learner 'lwc': unknown option 'epoch' (the options there: epochs, lambda_cl, lookahead, lr)"),
    ({"learner": "lwc", "learner_options": {"lambda_cl": 0.5}}, "lambda_cl weighs the cross-layer loss, which is off"),
    ({"learner": "sde", "learner_options": {"band": -1}}, "learner 'sde': option band=-1"),
    ({"learner_options": {"epochs": 3}}, "learner_options ['epochs'] are given but no learner"),
    ({"learner": "lwc", "grid": {"clip": True}}, "which learner 'lwc' learns itself; drop --clip"),
    ({"learner": "omniquant"}, "unknown learner 'omniquant'; available learners: lsi, lwc, "),
])
def test_bad_learner_settings_are_refused_by_the_checks_run_before_the_model_loads(config, expected):
    with pytest.raises((ValueError, KeyError), match=re.escape(expected)):
        check_plugins(QuantConfig.model_validate(config), registry_for(None))


class Watching(LWC):
    """LWC that records, for every block, the blocks it may look through and their weights."""

    def __init__(self):
        self.seen = {}

    def learn(self, task, options):
        self.seen[task.name] = [{name: tensor.clone() for name, tensor in block.state_dict().items()}
                                for block in task.following]
        return super().learn(task, options)


def manager_with(name, learner):
    pm = create_plugin_manager()

    class Plugin:
        @compquant.hookimpl
        def compquant_register_learners(self, register):
            register(name, learner)

    pm.register(Plugin())
    return pm


def test_the_look_ahead_goes_through_the_following_full_precision_blocks_as_far_as_there_are(make_llama, token_batches):
    watching = Watching()
    model = make_llama()
    original = make_llama()
    config = QuantConfig.model_validate({**LWC_CONFIG, "learner": "watching",
                                         "learner_options": {"epochs": 1, "lookahead": 2}})
    compquant.quantize(model, config, calibration=token_batches(4, 16), plugin_manager=manager_with("watching", watching))
    assert [len(following) for following in watching.seen.values()] == [1, 0]
    for name, tensor in original.model.layers[1].state_dict().items():
        assert torch.equal(watching.seen["model.layers.0"][0][name], tensor)


class WatchingKwargs(LWC):
    """LWC that records the keyword arguments each task hands its block and its look-ahead blocks."""

    def __init__(self):
        self.seen = {}

    def learn(self, task, options):
        self.seen[task.name] = (task.kwargs, task.following_kwargs)
        return super().learn(task, options)


def same_arguments(first, second):
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and torch.equal(first, second)
    if isinstance(first, (tuple, list)):
        return len(first) == len(second) and all(same_arguments(a, b) for a, b in zip(first, second))
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(same_arguments(first[k], second[k]) for k in first)
    return first == second


def test_each_look_ahead_block_gets_the_keyword_arguments_the_model_passes_it(make_gemma3, token_batches):
    """Gemma 3's sliding-window and global layers get their own masks and rotary embeddings: the
    look-ahead must run the global layer with its own, not the sliding-window layer's."""
    model, batches = make_gemma3(), token_batches(2, 16)
    passed = {index: [] for index in range(2)}
    hooks = [block.register_forward_pre_hook(lambda module, args, kwargs, index=index: passed[index].append(kwargs),
                                             with_kwargs=True) for index, block in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in batches.split(1):
            model(batch, use_cache=False)
    for hook in hooks:
        hook.remove()
    watching = WatchingKwargs()
    config = QuantConfig.model_validate({**LWC_CONFIG, "learner": "watching", "calibration": {"batch_size": 1},
                                         "learner_options": {"epochs": 1, "lookahead": 1}})
    compquant.quantize(model, config, calibration=batches, plugin_manager=manager_with("watching", watching))
    own, following = watching.seen["model.layers.0"]
    assert same_arguments(list(own), passed[0]) and same_arguments(list(following[0]), passed[1])
    assert not same_arguments(passed[0], passed[1])  # the two kinds of layer do get different ones


class Crash(Exception):
    pass


class CrashAt:
    def __init__(self, layer):
        self.layer = layer

    @compquant.hookimpl
    def compquant_after_layer(self, name, layer, result, report):
        if name == self.layer:
            raise Crash(name)


def test_a_killed_learning_run_resumes_after_the_last_finished_block_bit_identical(make_llama, token_batches, tmp_path):
    config = QuantConfig.model_validate(LWC_CONFIG)
    calibration = token_batches(4, 16)
    reference = make_llama()
    expected = compquant.quantize(reference, config, calibration=calibration)
    pm = create_plugin_manager()
    pm.register(CrashAt("model.layers.1.mlp.gate_proj"))
    with pytest.raises(Crash):
        compquant.quantize(make_llama(), config, calibration=calibration, plugin_manager=pm, resume_dir=tmp_path / "r")
    model = make_llama()
    report = compquant.quantize(model, config, calibration=calibration, resume_dir=tmp_path / "r")
    assert report.blocks[0].losses == expected.blocks[0].losses and len(report.blocks) == 2
    for (name, tensor), resumed in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(tensor, resumed), name
    for name, record in expected.records.items():
        assert torch.equal(report.records[name].scale, record.scale) and torch.equal(report.records[name].codes,
                                                                                     record.codes)


def test_low_memory_learning_equals_the_in_memory_run(make_llama, tiny_tokenizer, token_batches, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "tiny-llama"
    make_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    config = QuantConfig.model_validate(LWC_CONFIG)
    calibration = token_batches(4, 16)
    loaded = compquant.load_model(str(folder))
    report = compquant.quantize(loaded.model, config, calibration=calibration)
    compquant.save_quantized(loaded.model, None, tmp_path / "resident", config=config, report=report, format="fake")
    skeleton = compquant.load_model(str(folder), low_memory=True)
    streamed = quantize_low_memory(skeleton.model, skeleton.weights, config, tmp_path / "streamed",
                                   calibration=calibration, format="fake")
    assert [block.losses for block in streamed.blocks] == [block.losses for block in report.blocks]
    resident = load_file(tmp_path / "resident" / "model.safetensors")
    written = {}
    for shard in (tmp_path / "streamed").glob("model*.safetensors"):
        written.update(load_file(shard))
    assert resident.keys() == written.keys() and all(torch.equal(resident[key], written[key]) for key in resident)


class Scaling(compquant.Learner):
    """A learner that changes every weight (by half again), so that a stream run on the changed block
    would give other full-precision inputs than the model's."""

    def learn(self, task, options):
        with torch.no_grad():
            for linear in task.linears.values():
                linear.weight.mul_(1.5)
        return compquant.LearnedBlock({}, [])


@pytest.mark.parametrize("fp_inputs", ["stream", "cache"])
def test_gptaq_after_a_learner_takes_its_full_precision_inputs_from_the_unchanged_model(make_llama, token_batches,
                                                                                         monkeypatch, fp_inputs):
    from compquant.core.statistics import StatisticsAccumulator

    calibration = token_batches(4, 16)
    expected = []
    original = make_llama()
    handle = original.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, args: expected.append(args[0]))
    with torch.no_grad():
        original(calibration)
    handle.remove()
    seen, add = [], StatisticsAccumulator.add
    monkeypatch.setattr(StatisticsAccumulator, "add", lambda self, x, fp=None: (seen.append(fp), add(self, x, fp))[1])
    config = QuantConfig(solver="gptaq", learner="scaling", grid={"bits": 3, "group_size": 32},
                         calibration={"fp_inputs": fp_inputs})
    compquant.quantize(make_llama(), config, calibration=calibration, plugin_manager=manager_with("scaling", Scaling()))
    torch.testing.assert_close(seen[1], expected[0], rtol=1e-6, atol=1e-7)  # block 0, o_proj: after q/k/v changed


def test_learning_composes_with_quarot_on_the_rotated_model(make_llama, token_batches, block_error):
    from compquant.core.pipeline import apply_transforms
    from compquant.core.transform import TransformContext
    from compquant.models.llama import LLAMA

    calibration = token_batches(8, 16)
    rotated = make_llama()  # the full-precision model the learner sees: rotated, not quantized
    apply_transforms(rotated, ["quarot"], registry_for(None), LLAMA, TransformContext(seed=0), check=False)
    errors = {}
    for learner in (None, "lwc"):
        model = make_llama()
        config = QuantConfig(solver="rtn", learner=learner, transforms=["quarot"], grid={"bits": 3, "group_size": 32},
                             calibration={"batch_size": 1}, learner_options={"epochs": 6, "lr": 0.2} if learner else {})
        report = compquant.quantize(model, config, calibration=calibration)
        assert all(block.losses[-1] < block.losses[0] for block in report.blocks)
        errors[learner] = block_error(model, rotated, calibration.split(4))
    assert errors["lwc"] < 0.9 * errors[None]


def test_progress_shows_the_block_the_epoch_and_the_loss(make_llama, token_batches, monkeypatch, caplog):
    monkeypatch.delenv("COMPQUANT_NO_PROGRESS", raising=False)
    monkeypatch.setenv("COMPQUANT_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="compquant.progress"):
        compquant.quantize(make_llama(), QuantConfig.model_validate(LWC_CONFIG), calibration=token_batches(2, 8))
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("model.layers.0 epochs: 1 of 2 done, ") and "; loss " in lines[0]
    assert lines[2].startswith("lwc+rtn blocks: 1 of 2 done")
    assert lines[-1].startswith("lwc+rtn blocks: 2 of 2 done")


def test_a_learner_with_no_epochs_changes_no_weight(make_llama, token_batches):
    model = make_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    task_seen = []

    class Counting(LWC):
        def learn(self, task, options):
            task_seen.append(task.name)
            learned = super().learn(task, options)
            for name, linear in task.linears.items():
                assert torch.equal(linear.weight, before[f"{task.name}.{name}.weight"])
            return learned

    config = QuantConfig(solver="rtn", learner="counting", learner_options={"epochs": 0}, grid={"group_size": 32})
    report = compquant.quantize(model, config, calibration=token_batches(2, 8),
                                plugin_manager=manager_with("counting", Counting()))
    assert task_seen == ["model.layers.0", "model.layers.1"] and all(block.losses == [] for block in report.blocks)
