"""QuaRot keeps the model's function, composes with every solver, and survives a save and load."""
import copy

import pytest
import torch

import compquant
from compquant import QuantConfig
from compquant.core.online import online_ops
from compquant.models.llama import LLAMA
from compquant.plugins.hadamard import OnlineHadamard
from compquant.core.transform import TransformContext
from compquant.plugins.quarot import QuaRot


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tie, kv_heads", [(False, 4), (True, 2), (True, 1)])
@pytest.mark.parametrize("rotation", ["hadamard", "random"])
def test_quarot_preserves_the_function(make_llama, token_batches, tie, kv_heads, rotation):
    model = make_llama(tie=tie, kv_heads=kv_heads)
    ids = token_batches(2, 24, seed=4)
    reference = logits(model, ids)
    transform = QuaRot()
    transform.apply(model, LLAMA, transform.options({"rotation": rotation}), TransformContext())
    rotated = logits(model, ids)
    assert (rotated - reference).norm() / reference.norm() < 1e-4
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert all(torch.all(block.input_layernorm.weight == 1) for block in model.model.layers)
    assert [type(op) for op in online_ops(model.model.layers[0].mlp.down_proj)] == [OnlineHadamard]


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # Qwen3 normalises each head's q and k before RoPE
def test_r3_turns_queries_and_keys_so_the_kv_cache_holds_rotated_keys(make_llama, token_batches, family):
    model = make_llama(family, tie=True, kv_heads=2)
    ids = token_batches(1, 12, seed=5)
    with torch.no_grad():
        plain = model(ids, use_cache=True)
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    transform = QuaRot()
    transform.apply(model, LLAMA, transform.options({"r3": True}), TransformContext())
    attention = model.model.layers[1].self_attn
    assert [type(op) for op in online_ops(attention, "query")] == [OnlineHadamard]
    assert [type(op) for op in online_ops(attention, "key")] == [OnlineHadamard]
    with torch.no_grad():
        rotated = model(ids, use_cache=True)
    assert (rotated.logits - plain.logits).norm() / plain.logits.norm() < 1e-4
    # R1 leaves the post-RoPE keys as they were (k_proj reads the rotated stream with rotated weights);
    # R3 turns each head's cached key by the same Hadamard H, so keys·Hᵀ·H recovers them.
    head_dim = plain.past_key_values.layers[1].keys.shape[-1]
    h = OnlineHadamard(head_dim)
    cached = rotated.past_key_values.layers[1].keys
    torch.testing.assert_close(cached, h(plain.past_key_values.layers[1].keys), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cached, plain.past_key_values.layers[1].keys, atol=1e-2)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), greedy)


def test_quarot_spreads_weight_outliers_and_shrinks_rtn_error(make_llama):
    model = make_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, 5] *= 40  # an outlier input channel

    def kurtosis(w):
        w = w.detach()
        return float(((w - w.mean()) ** 4).mean() / w.var() ** 2)

    def rtn_error(w):
        w = w.detach()
        return float((compquant.quantize_layer(w, None, solver="rtn", bits=4, group_size=-1).weight - w).norm() / w.norm())

    up = model.model.layers[0].mlp.up_proj
    before = (kurtosis(up.weight), rtn_error(up.weight))
    QuaRot().apply(model, LLAMA, QuaRot().options(), TransformContext())
    assert kurtosis(up.weight) < before[0] / 5
    assert rtn_error(up.weight) < before[1] / 2


@pytest.mark.parametrize("solver, options", [("rtn", {}), ("gptq", {}), ("gptaq", {}), ("rescomp", {}), ("rescomp", {"base": "gptq"})])
def test_quarot_composes_with_every_solver(make_llama, token_batches, solver, options):
    model = make_llama(tie=True)
    calibration = token_batches(2, 16)
    config = QuantConfig(solver=solver, solver_options=options, transforms=["quarot"],
                         transform_options={"quarot": {"r3": True}}, grid={"bits": 4, "group_size": 32},
                         calibration={"fp_inputs": "stream"})  # the fp stream runs a copy of each rotated block
    report = compquant.quantize(model, config, calibration=calibration)
    assert len(report.layers) == 14
    assert len(online_ops(model.model.layers[1].mlp.down_proj)) == 1  # rotated once, not once per pass
    assert len(online_ops(model.model.layers[1].self_attn, "key")) == 1
    assert torch.isfinite(logits(model, calibration)).all()


def test_saved_rotated_model_restores_its_online_ops(make_llama, tiny_tokenizer, token_batches, tmp_path):
    model = make_llama(tie=True)
    config = QuantConfig(solver="gptq", transforms=["quarot"], grid={"bits": 4, "group_size": 32})
    report = compquant.quantize(model, config, calibration=token_batches(2, 16))
    output = compquant.save_quantized(model, tiny_tokenizer, tmp_path / "rotated", config=config, report=report)
    reloaded = compquant.load_model(str(output)).model
    assert [type(op) for op in online_ops(reloaded.model.layers[0].mlp.down_proj)] == [OnlineHadamard]
    ids = token_batches(2, 16, seed=3)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_saved_model_with_r3_restores_the_query_and_key_rotations(make_llama, tiny_tokenizer, token_batches, tmp_path):
    model = make_llama()
    config = QuantConfig(solver="rtn", transforms=["quarot"], transform_options={"quarot": {"r3": True}},
                         grid={"bits": 4, "group_size": 32})
    report = compquant.quantize(model, config, calibration=token_batches(2, 16))
    output = compquant.save_quantized(model, tiny_tokenizer, tmp_path / "r3", config=config, report=report)
    reloaded = compquant.load_model(str(output)).model
    for site in ("query", "key"):
        assert [type(op) for op in online_ops(reloaded.model.layers[0].self_attn, site)] == [OnlineHadamard]
    ids = token_batches(2, 16, seed=3)
    with torch.no_grad():
        keys = [m(ids, use_cache=True).past_key_values.layers[0].keys for m in (model, reloaded)]
    torch.testing.assert_close(keys[1], keys[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_layernorm_models_are_refused_with_a_reason():
    from torch import nn

    from compquant.plugins.quarot import prepare_for_rotation

    model = nn.Module()
    model.blocks = nn.ModuleList([nn.ModuleDict({"norm": nn.LayerNorm(8), "fc": nn.Linear(8, 8), "out": nn.Linear(8, 8)})])
    model.embed, model.final, model.head = nn.Embedding(4, 8), nn.LayerNorm(8), nn.Linear(8, 4)
    adapter = compquant.ArchitectureAdapter(name="ln", model_types=(), blocks="blocks", groups=(("fc",), ("out",)),
                                            norms={"norm": ("fc",)}, embedding="embed", final_norm="final", head="head",
                                            residual_writers=("out",))
    with pytest.raises(ValueError, match="RMSNorm models only"):
        prepare_for_rotation(model, adapter)
