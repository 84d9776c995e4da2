"""Mixture-of-experts decoders with fused experts (Qwen3-MoE, Qwen2-MoE, Mixtral): each expert
quantized from the tokens routed to it, the router left in full precision, and a fallback that is
logged and reported for an expert that gets too few tokens. Every solver, transform and export on
these models runs in test_architectures.py."""
import copy
import logging

import pytest
import torch
from torch import nn

import compquant
from compquant import QuantConfig
from compquant.core.plugin_manager import registry_for
from compquant.models.experts import RoutedExperts

FAMILIES = ["qwen3_moe", "mixtral", "qwen2_moe"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def prepared(model):
    """``model`` with its experts unfused by its adapter, as the calibration loop sees it."""
    registry_for(None).adapter_for(model).prepare(model)
    return model


def inputs_of(model, ids, names):
    """Every input each named module receives when ``model`` runs on ``ids`` (an expert's: its routed
    tokens only), as (tokens, width)."""
    seen = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen[name].append(args[0].flatten(0, -2))) for name in names]
    logits(model, ids)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(inputs) for name, inputs in seen.items()}


def expert_names(family):
    return ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_become_one_linear_per_projection_with_the_same_function(make_moe, token_batches, family):
    model = make_moe(family)
    ids = token_batches(2, 16, seed=3)
    before = logits(model, ids)
    adapter = registry_for(None).adapter_for(model)
    adapter.prepare(model)
    adapter.prepare(model)  # a second call changes nothing
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-6)
    block = model.model.layers[0]
    assert isinstance(block.mlp.experts, RoutedExperts) and len(block.mlp.experts) == 4
    linears = {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}
    quantized = adapter.for_block(block).linears()
    assert len(quantized) == len(set(quantized)) == 4 + 4 * 3 + (3 if family == "qwen2_moe" else 0)
    assert linears - set(quantized) == ({"mlp.shared_expert_gate"} if family == "qwen2_moe" else set())
    assert "mlp.gate" not in quantized  # the router


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_an_experts_codes_are_quantize_layer_on_exactly_its_routed_inputs(make_moe, token_batches, family):
    model = make_moe(family).double()
    original = prepared(copy.deepcopy(model))
    calibration = token_batches(8, 32)
    config = QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 32}, stats_dtype="float64",
                         calibration={"expert_min_tokens": 1})  # no fallback, however few tokens an expert gets
    report = compquant.quantize(model, config, calibration=calibration)
    gate, _, down = expert_names(family)
    names = [f"model.layers.0.mlp.experts.1.{gate}", f"model.layers.1.mlp.experts.2.{down}"]
    # the quantized model feeds each linear what the loop saw: everything before it was quantized first
    inputs = inputs_of(model, calibration, names)
    layers = {layer.name: layer for layer in report.layers}
    for name in names:
        expected = compquant.quantize_layer(original.get_submodule(name).weight.data, inputs[name], solver="gptq",
                                            bits=3, group_size=32, stats_dtype=torch.float64)
        assert report.records[name].codes.to(torch.int16).equal(expected.codes), name
        routed = inputs[name].shape[0]
        assert layers[name].routed_tokens == layers[name].tokens == routed < calibration.numel()
        assert layers[name].fallback is None


def test_gptaq_pairs_each_routed_token_with_its_full_precision_input(make_moe, token_batches):
    """X̃ of an expert is the full-precision model's input at the tokens the quantized model's router
    chose, wherever the two routers disagree."""
    model = make_moe("qwen3_moe").double()
    original = prepared(copy.deepcopy(model))
    calibration = token_batches(8, 32)
    config = QuantConfig(solver="gptaq", grid={"bits": 3, "group_size": 32}, stats_dtype="float64",
                         calibration={"expert_min_tokens": 1})
    report = compquant.quantize(model, config, calibration=calibration)
    name = "model.layers.1.mlp.experts.0.gate_proj"
    quantized_in = inputs_of(model, calibration, ["model.layers.1.mlp"])["model.layers.1.mlp"]
    fp_in = inputs_of(original, calibration, ["model.layers.1.mlp"])["model.layers.1.mlp"]
    with torch.no_grad():
        routed = (model.model.layers[1].mlp.gate(quantized_in)[2] == 0).any(-1)
        fp_routed = (original.model.layers[1].mlp.gate(fp_in)[2] == 0).any(-1)
    assert not torch.equal(routed, fp_routed)  # the routers disagree somewhere: the pairing matters
    expected = compquant.quantize_layer(original.get_submodule(name).weight.data, quantized_in[routed], solver="gptaq",
                                        fp_inputs=fp_in[routed], bits=3, group_size=32, stats_dtype=torch.float64)
    assert report.records[name].codes.to(torch.int16).equal(expected.codes)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_quantized_and_the_router_is_not(make_moe, token_batches, family):
    model = make_moe(family)
    routers = [block.mlp.gate.weight.clone() for block in model.model.layers]
    report = compquant.quantize(model, QuantConfig(solver="gptq", grid={"bits": 2, "group_size": 32}),
                                calibration=token_batches(4, 16))
    for index, block in enumerate(model.model.layers):
        assert torch.equal(block.mlp.gate.weight, routers[index])
        for expert in range(4):
            for name in expert_names(family):
                linear = block.mlp.experts[expert].get_submodule(name)
                assert f"model.layers.{index}.mlp.experts.{expert}.{name}" in report.records
                assert all(len(torch.unique(row)) <= 4 for row in linear.weight[:, :32])  # 2-bit groups
    if family == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert.down_proj" in report.records
        assert "model.layers.0.mlp.shared_expert_gate" not in report.records


def test_dense_and_sparse_blocks_in_one_model(make_moe, token_batches):
    model = make_moe("qwen3_moe", dense_layers=(0,))
    report = compquant.quantize(model, QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32}),
                                calibration=token_batches(4, 16))
    assert {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.experts.3.down_proj"} <= set(report.records)
    assert len(report.records) == 7 + 4 + 4 * 3


@pytest.mark.parametrize("fallback", ["all-tokens", "rtn"])
def test_an_expert_with_too_few_tokens_falls_back_and_says_so(make_moe, token_batches, caplog, fallback):
    model = make_moe("qwen3_moe")
    original = prepared(copy.deepcopy(model))
    calibration = token_batches(4, 16)
    config = QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32},
                         calibration={"expert_min_tokens": 40, "expert_fallback": fallback})
    with caplog.at_level(logging.WARNING, logger="compquant.core.calibration"):
        report = compquant.quantize(model, config, calibration=calibration)
    experts = [layer for layer in report.layers if ".experts." in layer.name]
    fell = [layer for layer in experts if layer.fallback is not None]
    assert fell and len(fell) < len(experts) and all(layer.fallback == fallback for layer in fell)
    assert all(layer.routed_tokens < 40 for layer in fell)
    assert all(layer.routed_tokens >= 40 for layer in experts if layer.fallback is None)
    assert all(layer.fallback is None for layer in report.layers if ".experts." not in layer.name)
    first = fell[0]
    expert = first.name.rsplit(".", 1)[0]
    warning = next(record.getMessage() for record in caplog.records if f"{expert}." in record.getMessage())
    assert f"received {first.routed_tokens} routed calibration tokens, fewer than 40" in warning
    assert f"expert_fallback: {fallback}" in warning
    assert report.to_dict()["layers"][report.layers.index(first)]["fallback"] == fallback
    if fallback == "all-tokens":
        assert first.tokens == calibration.numel() and first.solver == "gptq"
    else:
        assert first.solver == "rtn" and first.tokens is None
        expected = compquant.quantize_layer(original.get_submodule(first.name).weight.data, None, solver="rtn",
                                            bits=4, group_size=32)
        assert report.records[first.name].codes.to(torch.int16).equal(expected.codes)


def test_the_all_tokens_fallback_is_quantize_layer_on_every_token(make_moe, token_batches):
    model = make_moe("mixtral").double()
    original = prepared(copy.deepcopy(model))
    calibration = token_batches(4, 16)
    config = QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 32}, stats_dtype="float64",
                         calibration={"expert_min_tokens": calibration.numel() + 1})  # every expert falls back
    report = compquant.quantize(model, config, calibration=calibration)
    assert all(layer.fallback == "all-tokens" for layer in report.layers if ".experts." in layer.name)
    name = "model.layers.0.mlp.experts.2.w1"
    every_token = inputs_of(model, calibration, ["model.layers.0.mlp.experts"])["model.layers.0.mlp.experts"]
    expected = compquant.quantize_layer(original.get_submodule(name).weight.data, every_token, solver="gptq", bits=3,
                                        group_size=32, stats_dtype=torch.float64)
    assert report.records[name].codes.to(torch.int16).equal(expected.codes)


def test_a_fallback_solver_that_needs_statistics_is_refused(make_moe):
    with pytest.raises(ValueError, match="expert_fallback must be 'all-tokens' or a solver that needs no"):
        compquant.quantize(make_moe(), QuantConfig(solver="gptq", grid={"group_size": 32}, calibration={"expert_fallback": "gptq"}),
                           calibration=torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("format", ["fake", "compressed-tensors", "gptq", "gptq-v2"])
def test_compquant_reads_every_export_back(make_moe, token_batches, tiny_tokenizer, tmp_path, format):
    model = make_moe("qwen2_moe")
    config = QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32, "sym": True})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16))
    output = compquant.save_quantized(model, tiny_tokenizer, tmp_path / "out", config=config, report=report,
                                      format=format)
    reloaded = compquant.load_model(str(output)).model
    ids = token_batches(2, 16, seed=9)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_compressed_tensors_refuses_asymmetric_experts_before_the_work(make_moe, tiny_tokenizer, tmp_path):
    from compquant.core.exporters import ExportError, check_planned_export
    from compquant.core.pipeline import planned_export

    model = make_moe("mixtral")
    config = QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32})  # asymmetric
    registry = registry_for(None)
    with pytest.raises(ExportError, match=r"experts\.0\.w1 and \d+ other expert linears have asymmetric grids.*"
                                          r"without their zero points; quantize with a symmetric grid"):
        check_planned_export("compressed-tensors", planned_export(model, config, registry), registry)
    check_planned_export("gptq-v2", planned_export(model, config, registry), registry)


def test_low_memory_streams_per_expert_checkpoints_and_refuses_renamed_ones(make_moe, token_batches, tiny_tokenizer,
                                                                          tmp_path):
    """transformers saves Qwen3-MoE's experts under the names the unfused model has; Mixtral's sparse
    block under block_sparse_moe, which low-memory mode does not map: a clear error, never a block
    left on the meta device."""
    from compquant.core.errors import ModelLoadError
    from compquant.core.low_memory import quantize_low_memory

    config = QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32, "sym": True})
    calibration = token_batches(4, 16)
    for family in ("qwen3_moe", "mixtral"):
        model = make_moe(family)
        model.save_pretrained(tmp_path / family)
        tiny_tokenizer.save_pretrained(tmp_path / family)
        skeleton = compquant.load_model(str(tmp_path / family), low_memory=True)
        if family == "mixtral":
            with pytest.raises(ModelLoadError, match=r"no tensor named model\.layers\.0\.mlp\..*block_sparse_moe"):
                quantize_low_memory(skeleton.model, skeleton.weights, config, tmp_path / f"{family}-out",
                                    calibration=calibration)
            continue
        quantize_low_memory(skeleton.model, skeleton.weights, config, tmp_path / f"{family}-out",
                            tokenizer=skeleton.tokenizer, calibration=calibration)
        compquant.quantize(model, config, calibration=calibration)
        reloaded = compquant.load_model(str(tmp_path / f"{family}-out")).model
        ids = token_batches(2, 16, seed=9)
        torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_an_adapter_named_explicitly_fits_the_fused_model_before_it_is_unfused(make_moe, token_batches):
    model = make_moe("mixtral")
    assert registry_for(None).adapter_for(model, "mixtral").name == "mixtral"
    report = compquant.quantize(model, QuantConfig(adapter="mixtral", solver="rtn", grid={"group_size": 32}))
    assert "model.layers.1.mlp.experts.3.w2" in report.records
