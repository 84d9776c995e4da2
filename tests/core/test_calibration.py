"""The layer-by-layer loop on tiny models built here."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import compquant
from compquant import ArchitectureAdapter, QuantConfig, Statistic
from compquant.core.online import OnlineOp, attach_input_op, online_ops
from compquant.core.plugin_manager import create_plugin_manager
from compquant.plugins.gptq import GPTQ


class RecordingGPTQ(GPTQ):
    """GPTQ that keeps the Hessian it was given for every call."""

    def __init__(self):
        self.hessians = []

    def solve(self, weight, stats, grid, options):
        self.hessians.append(stats.hessian.clone())
        return super().solve(weight, stats, grid, options)


class RegisterRecording:
    def __init__(self, solver):
        self.solver = solver

    @compquant.hookimpl
    def compquant_register_solvers(self, register):
        register("recording-gptq", self.solver)


def inputs_of_every_linear(model, calibration, names):
    """2/N XᵀX of every named linear's input when the (final) model runs on the calibration set."""
    seen = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0]))
        for name in names
    ]
    with torch.no_grad():
        model(calibration, use_cache=False)
    for handle in handles:
        handle.remove()
    result = {}
    for name, tensors in seen.items():
        x = torch.cat(tensors).reshape(-1, tensors[0].shape[-1]).double()
        result[name] = 2 / x.shape[0] * x.T @ x
    return result


@pytest.mark.parametrize("family", ["make_llama", "make_gemma3"])
def test_each_group_is_calibrated_on_the_outputs_of_the_quantized_groups_before_it(request, token_batches, family):
    """True-sequential: the Hessian every group received equals the one the *final* quantized model
    produces at that group's input, since everything upstream of it was already quantized. Gemma 3's
    second block is a global-attention layer after a sliding-window one: each block must get its own
    mask and rotary embedding from the model, not the first block's."""
    model = request.getfixturevalue(family)()
    calibration = token_batches(6, 24)
    solver = RecordingGPTQ()
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(RegisterRecording(solver))
    config = QuantConfig(solver="recording-gptq", grid={"bits": 3, "group_size": 32}, stats_dtype="float64",
                         calibration={"batch_size": 4})
    report = compquant.quantize(model, config, calibration=calibration, plugin_manager=pm)
    names = [layer.name for layer in report.layers]
    expected = inputs_of_every_linear(model, calibration, names)
    firsts = [name for name in names if name.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))]
    assert len(names) == 14 and len(solver.hessians) == len(firsts) == 8  # one stacked solve per group
    for name, hessian in zip(firsts, solver.hessians):
        torch.testing.assert_close(hessian, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_whole_loop_quantizes_every_linear_onto_its_grid(make_llama, token_batches):
    model = make_llama()
    original = copy.deepcopy(model)
    config = QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 32})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16))
    assert len(report.layers) == 14 and report.calibration_tokens == 64
    assert all(0 < layer.relative_error < 0.5 for layer in report.layers)
    for layer in report.layers:
        weight = model.get_submodule(layer.name).weight
        assert not torch.equal(weight, original.get_submodule(layer.name).weight)
        for group in weight.split(32, dim=1):  # each row of each group takes at most 2^3 values
            assert max(len(torch.unique(row)) for row in group) <= 8
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)  # the head stays in full precision
    with torch.no_grad():
        ids = token_batches(1, 16, seed=5)
        assert torch.isfinite(model(ids).logits).all()


def test_rtn_runs_without_calibration_data(make_llama):
    model = make_llama()
    report = compquant.quantize(model, QuantConfig(solver="rtn", grid={"bits": 4, "group_size": -1}))
    assert report.calibration_tokens == 0 and len(report.layers) == 14
    assert all(layer.relative_error is None for layer in report.layers)


def test_gptq_without_calibration_or_tokenizer_says_what_is_missing(make_llama):
    with pytest.raises(ValueError, match="needs calibration data"):
        compquant.quantize(make_llama(), QuantConfig(solver="gptq"))


def test_non_finite_activations_stop_the_run_with_the_layer_name(make_llama, token_batches, live_forwards):
    model = make_llama()  # finite weights (those are checked first), activations turned NaN
    model.model.layers[1].input_layernorm.register_forward_hook(lambda module, args, output: output * float("nan"))
    before = model.model.layers[1].self_attn.q_proj.weight.clone()
    with pytest.raises(ArithmeticError, match=r"model.layers.1.self_attn.q_proj.*non-finite activations"):
        compquant.quantize(model, QuantConfig(solver="gptq", grid={"group_size": 32}), calibration=token_batches(2, 8))
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, before)
    assert not live_forwards()  # raised while the block's forwards waited in front of q/k/v


def test_a_block_whose_quantized_output_overflows_stops_the_run_with_its_name(make_llama, token_batches):
    model = make_llama()
    model.model.layers[1].mlp.register_forward_hook(lambda module, args, output: output * float("inf"))
    with pytest.raises(ArithmeticError, match=r"outputs of model.layers.1 hold NaN or Inf.*nothing was written"):
        compquant.quantize(model, QuantConfig(solver="gptq", grid={"group_size": 32}), calibration=token_batches(2, 8))


class Scale(OnlineOp):
    def __init__(self, factor: float):
        super().__init__()
        self.register_buffer("factor", torch.tensor(factor))

    def forward(self, x):
        return x * self.factor


class ScaleOProj(compquant.Transform):
    """Function-preserving: o_proj's input is doubled online, its weight halved offline."""

    def apply(self, model, adapter, options, context):
        for block in adapter.block_list(model):
            linear = block.get_submodule("self_attn.o_proj")
            attach_input_op(linear, Scale(2.0))
            linear.weight.data /= 2


class RegisterScale:
    @compquant.hookimpl
    def compquant_register_transforms(self, register):
        register("scale-o", ScaleOProj())


def test_transform_runs_before_calibration_and_its_online_op_is_seen_everywhere(make_llama, token_batches):
    model = make_llama()
    ids = token_batches(2, 16, seed=3)
    with torch.no_grad():
        reference = model(ids).logits
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(RegisterScale())
    solver = RecordingGPTQ()
    pm.register(RegisterRecording(solver))
    config = QuantConfig(solver="recording-gptq", transforms=["scale-o"], grid={"bits": 8, "group_size": -1})
    compquant.quantize(model, config, calibration=ids, plugin_manager=pm)
    o_proj = model.model.layers[0].self_attn.o_proj
    assert [type(op) for op in online_ops(o_proj)] == [Scale]
    expected = inputs_of_every_linear(model, ids, ["model.layers.0.self_attn.o_proj"])
    torch.testing.assert_close(solver.hessians[1].double(), expected["model.layers.0.self_attn.o_proj"], rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # 8-bit weights: the scaled model still computes nearly the original function
        torch.testing.assert_close(model(ids).logits, reference, rtol=0.05, atol=0.05)


class ToyBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ToyModel(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy-mlp")
        self.stem = nn.Linear(4, width)
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class RegisterToyAdapter:
    @compquant.hookimpl
    def compquant_register_adapters(self, register):
        register("toy", ArchitectureAdapter(name="toy", model_types=("toy-mlp",), blocks="blocks",
                                            groups=(("fc1",), ("fc2",)), norms={"norm": ("fc1",)}))


def test_a_new_architecture_needs_only_an_adapter_plugin():
    torch.manual_seed(0)
    model = ToyModel()
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(RegisterToyAdapter())
    inputs = torch.randn(4, 10, 4, generator=torch.Generator().manual_seed(0))
    config = QuantConfig(solver="gptq", grid={"bits": 4, "group_size": -1}, calibration={"batch_size": 2})
    report = compquant.quantize(model, config, calibration=inputs, plugin_manager=pm)
    assert [layer.name for layer in report.layers] == [f"blocks.{i}.{n}" for i in range(3) for n in ("fc1", "fc2")]


def test_solver_statistics_decide_what_the_loop_collects():
    assert GPTQ().statistics(GPTQ().options()) == frozenset({Statistic.HESSIAN})


class RecordingGPTAQ(compquant.Solver):
    """Wraps GPTAQ and keeps the statistics it was given (copies) and weak references to them."""

    def __init__(self):
        from compquant.plugins.gptaq import GPTAQ

        self.inner = GPTAQ()
        self.Options = self.inner.Options
        self.seen, self.alive = [], []

    def statistics(self, options):
        return self.inner.statistics(options)

    def solve(self, weight, stats, grid, options):
        import weakref

        self.alive = [ref for ref in self.alive if ref() is not None]
        self.seen.append((stats.hessian.clone(), stats.cross.clone(), len({id(ref()) for ref in self.alive})))
        self.alive.append(weakref.ref(stats.hessian))
        return self.inner.solve(weight, stats, grid, options)


def test_gptaq_cross_term_comes_from_a_streamed_full_precision_model(make_llama, token_batches):
    """dXXT of every group equals (X̃ − X)Xᵀ with X̃ the *original* model's inputs to that linear and
    X the final quantized model's; statistics of earlier groups are freed before later solves."""
    model = make_llama()
    original = copy.deepcopy(model)
    calibration = token_batches(4, 16)
    solver = RecordingGPTAQ()

    class Register:
        @compquant.hookimpl
        def compquant_register_solvers(self, register):
            register("recording-gptaq", solver)

    pm = create_plugin_manager(load_entry_points=False)
    pm.register(Register())
    config = QuantConfig(solver="recording-gptaq", grid={"bits": 3, "group_size": 32}, stats_dtype="float64",
                         calibration={"batch_size": 2})
    report = compquant.quantize(model, config, calibration=calibration, plugin_manager=pm)
    names = [layer.name for layer in report.layers]

    def inputs(m):
        seen = {name: [] for name in names}
        handles = [m.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0])) for n in names]
        with torch.no_grad():
            m(calibration, use_cache=False)
        for handle in handles:
            handle.remove()
        return {n: torch.cat(t).reshape(-1, t[0].shape[-1]).double() for n, t in seen.items()}

    quantized, full_precision = inputs(model), inputs(original)
    # statistics alive when each linear is solved, not counting its own group's: always none
    shares_with_previous = [0, 1, 1, 0, 0, 1, 0] * 2  # q,k,v | o | gate,up | down, per block
    for (name, (hessian, cross, alive)), shared in zip(zip(names, solver.seen), shares_with_previous):
        x, fp = quantized[name], full_precision[name]
        torch.testing.assert_close(cross, 2 / x.shape[0] * (fp - x).T @ x, rtol=1e-4, atol=1e-6, msg=name)
        assert alive == shared, name
    assert solver.seen[0][1].abs().max() == 0  # the first group of the first block sees identical streams
    assert solver.seen[3][1].abs().max() > 0  # o_proj: its inputs differ once q/k/v are quantized


def test_full_precision_stream_only_when_the_solver_asks(make_llama, token_batches, monkeypatch):
    from compquant.core import calibration as loop

    made = []
    real = loop._full_precision

    def counted(*args):
        source = real(*args)
        made.extend([] if source is None else [source])
        return source

    monkeypatch.setattr(loop, "_full_precision", counted)
    for solver, options, expected in (("gptq", {}, 0), ("gptaq", {}, 2), ("rescomp", {}, 2), ("rescomp", {"base": "gptq"}, 0)):
        made.clear()
        config = QuantConfig(solver=solver, solver_options=options, grid={"group_size": 32})
        compquant.quantize(make_llama(), config, calibration=token_batches(2, 8))
        assert len(made) == expected, (solver, options)


@pytest.mark.parametrize("solver", ["gptaq", "rescomp"])
def test_cached_and_streamed_full_precision_inputs_give_the_same_model(make_llama, token_batches, solver, monkeypatch):
    from compquant.core import calibration as loop

    copies = []
    real = loop.copy.deepcopy
    monkeypatch.setattr(loop.copy, "deepcopy", lambda obj, *a: (isinstance(obj, nn.Module) and copies.append(1)) or real(obj, *a))
    results = {}
    for mode in ("stream", "cache"):
        copies.clear()
        model = make_llama()
        config = QuantConfig(solver=solver, grid={"bits": 3, "group_size": 32}, stats_dtype="float64",
                             calibration={"fp_inputs": mode, "batch_size": 2})
        compquant.quantize(model, config, calibration=token_batches(4, 16))
        results[mode] = model.state_dict()
        assert len(copies) == (2 if mode == "stream" else 0)  # a block copy per block only when streaming
    for name, tensor in results["stream"].items():
        assert torch.equal(tensor, results["cache"][name]), name


def test_sequential_blocks_takes_every_groups_statistics_from_one_pass_of_the_unquantized_block(
        make_llama, token_batches):
    model = make_llama()
    calibration = token_batches(4, 16)
    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0]))
             for name, module in model.model.layers[0].named_modules() if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        model(calibration, use_cache=False)
    for hook in hooks:
        hook.remove()
    weights = {name: module.weight.detach().clone() for name, module in model.model.layers[0].named_modules()
               if isinstance(module, torch.nn.Linear)}
    passes = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: passes.append(1))
    config = QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 32}, stats_dtype="float64",
                         calibration={"sequential": "blocks", "batch_size": 4})
    report = compquant.quantize(model, config, calibration=calibration)
    assert len(passes) == 3  # catching the inputs, statistics of all four groups, propagation
    for name, x in inputs.items():
        expected = compquant.quantize_layer(weights[name], x.reshape(-1, x.shape[-1]), solver="gptq", bits=3,
                                            group_size=32, stats_dtype=torch.float64)
        assert torch.equal(report.records[f"model.layers.0.{name}"].codes.to(torch.int16), expected.codes), name


@pytest.mark.parametrize("fp_inputs", ["cache", "stream"])
def test_sequential_blocks_pairs_the_full_precision_inputs_of_each_batch(make_llama, token_batches, fp_inputs):
    calibration = token_batches(4, 16)
    results = []
    for batch_size in (1, 4):  # the cross term must not depend on how the tokens are batched
        model = make_llama()
        config = QuantConfig(solver="gptaq", grid={"bits": 3, "group_size": 32}, stats_dtype="float64",
                             calibration={"sequential": "blocks", "fp_inputs": fp_inputs, "batch_size": batch_size})
        results.append(compquant.quantize(model, config, calibration=calibration).records)
    for name, record in results[0].items():
        assert (record.codes != results[1][name].codes).float().mean() < 0.01, name


@pytest.mark.parametrize("solver, options", [("gptq", {"act_order": True}), ("rescomp", {"base": "gptaq"})])
def test_a_group_solved_stacked_equals_its_linears_solved_one_by_one(make_llama, token_batches, monkeypatch, solver,
                                                                      options):
    from compquant.core.plugin_manager import registry_for

    config = QuantConfig(solver=solver, solver_options=options, grid={"bits": 3, "group_size": 32}, stats_dtype="float64")
    stacked = compquant.quantize(make_llama(), config, calibration=token_batches(4, 16))
    monkeypatch.setattr(type(registry_for(None).get("solver", solver)), "rows_independent", False)
    one_by_one = compquant.quantize(make_llama(), config, calibration=token_batches(4, 16))
    for name, record in stacked.records.items():
        assert torch.equal(record.codes, one_by_one.records[name].codes), name
        assert torch.allclose(record.scale, one_by_one.records[name].scale), name


# ------------------------------------------------------------------ one pass per block
STREAMS = {"rtn": 0, "gptq": 1, "gptaq": 2, "rescomp": 2}  # the built-ins' streams: quantized, + full precision


def linear_calls(model):
    """Calls of every linear in the blocks, by name; copies of a block (the full-precision stream's)
    count under the same names."""
    calls = {}
    for name, module in model.model.layers.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda m, args, name=name: calls.update({name: calls.get(name, 0) + 1}))
    return calls


@pytest.mark.parametrize("sequential", ["groups", "blocks"])
def test_every_linear_runs_once_per_batch_per_stream_per_block(make_llama, token_batches, sequential):
    from compquant.core.plugin_manager import registry_for

    registry = registry_for(None)
    cases = [(name, {}) for name in registry.names("solver")] + [("rescomp", {"base": "gptq"})]
    for solver, options in cases:
        instance = registry.get("solver", solver)
        wanted = instance.statistics(instance.options(options))
        streams = (1 + any(s.needs_fp_inputs for s in wanted)) if wanted else 0
        assert solver not in STREAMS or options or streams == STREAMS[solver], solver
        model = make_llama()
        calls = linear_calls(model)
        config = QuantConfig(solver=solver, solver_options=options, grid={"bits": 3, "group_size": 32},
                             calibration={"batch_size": 2, "sequential": sequential})
        compquant.quantize(model, config, calibration=token_batches(6, 16))  # 3 batches, 2 blocks
        passes = streams + (sequential == "blocks" and streams > 0)  # blocks: the quantized stream twice
        assert len(calls) == (14 if passes else 0) and set(calls.values()) <= {3 * passes}, (solver, options, calls)


def rerunning_reference_block(block, inputs, plan, prefix, finished, learn=None):
    """The loop as it was before one pass per block, kept as the reference: each group's inputs
    come from re-running the block from its input up to the group's first linear for every batch
    (X̃ likewise through an unquantized copy), then the quantized block runs once more. (It has no
    learner, as the loop had none then.)"""
    from compquant.core import calibration as loop

    assert learn is None

    original = copy.deepcopy(block) if inputs.fp_hidden is not None else None

    class Caught(Exception):
        pass

    def input_of(module, name, hidden, kwargs):
        seen = []
        handle = module.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0]) or throw())
        try:
            module(hidden, **kwargs)
        except Caught:
            pass
        finally:
            handle.remove()
        return seen[0]

    def throw():
        raise Caught

    def statistics(group):
        accumulator = plan.accumulator(block.get_submodule(group[0]).in_features)
        for index, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            fp = None if original is None else input_of(original, group[0], inputs.fp_hidden[index], kwargs)
            accumulator.add(input_of(block, group[0], hidden, kwargs), fp)
        return accumulator.result()

    def run(module, hidden):
        outputs = [module(h, **kwargs) for h, kwargs in zip(hidden, inputs.kwargs)]
        return [out[0] if isinstance(out, tuple) else out for out in outputs]

    groups = plan.adapter.groups
    if plan.sequential == "blocks":
        for group, stats in zip(groups, [statistics(group) for group in groups]):
            loop._solve(block, group, stats, plan, prefix, finished, {})
    else:
        for group in groups:
            loop._solve(block, group, statistics(group), plan, prefix, finished, {})
    return loop.Activations(run(block, inputs.hidden), inputs.kwargs,
                            None if original is None else run(original, inputs.fp_hidden))


def one_pass_and_reference(make_llama, token_batches, monkeypatch, config):
    from compquant.core import calibration as loop

    results = []
    for block_function in (loop.quantize_block, rerunning_reference_block):
        monkeypatch.setattr(loop, "quantize_block", block_function)
        model = make_llama()
        report = compquant.quantize(model, config, calibration=token_batches(6, 24))
        results.append((model.state_dict(), report))
    return results


SOLVER_CASES = [("gptq", {"act_order": True}), ("gptaq", {}), ("rescomp", {"base": "gptaq"}), ("rescomp", {"base": "gptq"})]


@pytest.mark.parametrize("sequential", ["groups", "blocks"])
@pytest.mark.parametrize("solver, options", SOLVER_CASES)
def test_one_pass_is_bit_identical_to_the_rerunning_loop_in_float64(make_llama, token_batches, monkeypatch, solver,
                                                                   options, sequential):
    config = QuantConfig(solver=solver, solver_options=options, grid={"bits": 3, "group_size": 32}, stats_dtype="float64",
                         calibration={"batch_size": 2, "sequential": sequential})
    (state, report), (expected_state, expected) = one_pass_and_reference(make_llama, token_batches, monkeypatch, config)
    assert [layer.name for layer in report.layers] == [layer.name for layer in expected.layers]
    for name, record in expected.records.items():
        assert torch.equal(report.records[name].codes, record.codes), name
        assert torch.equal(report.records[name].scale, record.scale), name
    assert all(torch.equal(tensor, expected_state[name]) for name, tensor in state.items())


@pytest.mark.parametrize("solver, options", SOLVER_CASES)
def test_one_pass_equals_the_rerunning_loop_to_float32_noise(make_llama, token_batches, monkeypatch, solver, options):
    """(Same operations on the same inputs: on one machine the codes come out identical; across
    thread counts and CPUs float32 may round differently, which is all this test allows.)"""
    config = QuantConfig(solver=solver, solver_options=options, grid={"bits": 3, "group_size": 32},
                         calibration={"batch_size": 2, "fp_inputs": "stream"})
    (_, report), (_, expected) = one_pass_and_reference(make_llama, token_batches, monkeypatch, config)
    for ours, theirs in zip(report.layers, expected.layers):
        assert (report.records[ours.name].codes != expected.records[ours.name].codes).float().mean() < 0.01, ours.name
        assert ours.relative_error == pytest.approx(theirs.relative_error, rel=1e-3), ours.name


class FailingGPTQ(GPTQ):
    """GPTQ that raises the given exception when asked to solve its ``at``-th group."""

    def __init__(self, error, at):
        self.error, self.at, self.calls = error, at, 0

    def solve(self, weight, stats, grid, options):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return super().solve(weight, stats, grid, options)


@pytest.mark.parametrize("error", [ArithmeticError("the solve diverged"), KeyboardInterrupt("stop")])
def test_an_error_between_paused_forwards_propagates_and_leaves_no_forward_running(make_llama, token_batches, error,
                                                                                   live_forwards):
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(RegisterRecording(FailingGPTQ(error, at=3)))  # block 0's gate/up: q/k/v and o are done
    config = QuantConfig(solver="recording-gptq", grid={"bits": 3, "group_size": 32}, calibration={"batch_size": 2})
    with pytest.raises(type(error), match=str(error)):
        compquant.quantize(make_llama(), config, calibration=token_batches(6, 16), plugin_manager=pm)
    assert not live_forwards()


def test_an_interrupt_while_a_forward_computes_unwinds_every_forward(make_llama, token_batches, live_forwards):
    """Ctrl-C arrives while a paused forward is computing: the interrupt leaves that forward, reaches
    the caller, and every other paused forward is unwound."""
    import os
    import signal

    model = make_llama()
    interrupted = []

    def interrupt(module, args):
        if not interrupted:
            interrupted.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    model.model.layers[1].mlp.act_fn.register_forward_pre_hook(interrupt)  # between gate/up and down_proj
    with pytest.raises(KeyboardInterrupt):
        compquant.quantize(model, QuantConfig(solver="gptaq", grid={"group_size": 32},
                                              calibration={"batch_size": 2, "fp_inputs": "stream"}),
                           calibration=token_batches(4, 16))
    assert interrupted and not live_forwards()


def test_an_error_raised_inside_the_block_reaches_the_caller_with_its_message(make_llama, token_batches,
                                                                              live_forwards):
    model = make_llama()

    def broken(module, args):
        raise RuntimeError("attention kernel failed")

    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(broken)
    with pytest.raises(RuntimeError, match="attention kernel failed"):
        compquant.quantize(model, QuantConfig(solver="gptq", grid={"group_size": 32}), calibration=token_batches(4, 16))
    assert not live_forwards()


def test_groups_listed_out_of_the_blocks_order_are_a_clear_error(live_forwards):
    torch.manual_seed(0)
    pm = create_plugin_manager(load_entry_points=False)

    class Reversed:
        @compquant.hookimpl
        def compquant_register_adapters(self, register):
            register("toy", ArchitectureAdapter(name="toy", model_types=("toy-mlp",), blocks="blocks",
                                                groups=(("fc2",), ("fc1",))))

    pm.register(Reversed())
    inputs = torch.randn(4, 10, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"blocks\.0\.fc1 \(group 2\) ran before any linear of group 1 \(fc2\)"):
        compquant.quantize(ToyModel(), QuantConfig(solver="gptq", grid={"bits": 4, "group_size": -1}),
                           calibration=inputs, plugin_manager=pm)
    assert not live_forwards()
