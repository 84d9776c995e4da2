"""The architectures added through adapters alone, each on a tiny random model built here: every
solver quantizes every linear, every transform keeps the function, and every export format that
can express the run reloads with the same logits (in plain transformers where the format allows)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import compquant
from compquant import QuantConfig

SOLVERS = [("rtn", {}), ("gptq", {}), ("gptaq", {}), ("rescomp", {}), ("rescomp", {"base": "gptq"})]
#: family: (fixture, its keyword arguments, the quantized linears of the two blocks)
FAMILIES = {
    "gemma3": ("make_gemma3", {"even_output_norms": True}, 14),
    "qwen3": ("make_llama", {"family": "qwen3", "tie": True, "head_dim": 32}, 14),
    "qwen3_moe": ("make_moe", {"family": "qwen3_moe"}, 2 * (4 + 4 * 3)),  # attention, 4 experts
    "mixtral": ("make_moe", {"family": "mixtral"}, 2 * (4 + 4 * 3)),
    "qwen2_moe": ("make_moe", {"family": "qwen2_moe"}, 2 * (4 + 3 + 4 * 3)),  # and the shared expert
}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    fixture, kwargs, linears = FAMILIES[request.param]
    return request.param, lambda: request.getfixturevalue(fixture)(**kwargs), linears


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def relative(after, before):
    return float((after - before).norm() / before.norm())


@pytest.mark.parametrize("solver, options", SOLVERS, ids=lambda value: value if isinstance(value, str) else "")
def test_every_solver_quantizes_every_linear(family, token_batches, solver, options):
    _, make, linears = family
    model = make()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    head = model.lm_head.weight.clone()
    config = QuantConfig(solver=solver, solver_options=options, grid={"bits": 4, "group_size": 32},
                         calibration={"fp_inputs": "stream"})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16))
    assert len(report.records) == linears and torch.isfinite(logits(model, token_batches(1, 16))).all()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied  # a tied head stays tied
    assert torch.equal(model.lm_head.weight, head)  # and in full precision


@pytest.mark.parametrize("transform, options", [("quarot", {"r3": True}), ("quarot", {"rotation": "random"}),
                                                ("spinquant", {"steps": 3, "batch_size": 2, "r3": True})],
                         ids=["quarot-r3", "quarot-random", "spinquant-r3"])
def test_every_transform_keeps_the_function(family, token_batches, tmp_path, monkeypatch, transform, options):
    monkeypatch.setenv("COMPQUANT_CACHE_DIR", str(tmp_path))
    _, make, _ = family
    model = make()
    ids = token_batches(2, 24, seed=4)
    before = logits(model, ids)
    config = QuantConfig(solver="gptq", transforms=[transform], transform_options={transform: options},
                         grid={"bits": 4, "group_size": 32}, transform_tolerance=1e-5)
    pm = compquant.create_plugin_manager(load_entry_points=False)
    checked = []

    class Stop:  # the function right after the transforms, before anything is quantized
        @compquant.hookimpl
        def compquant_before_calibration(self, model, adapter, config):
            checked.append(relative(logits(model, ids), before))
            raise StopIteration

    pm.register(Stop())
    with pytest.raises(StopIteration):
        compquant.quantize(model, config, calibration=token_batches(4, 16), plugin_manager=pm)
    assert checked[0] < 1e-5


@pytest.mark.parametrize("format", ["fake", "compressed-tensors", "gptq"])
def test_export_round_trip(family, token_batches, tiny_tokenizer, tmp_path, format):
    _, make, _ = family
    model = make()
    config = QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32, "sym": True})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16))
    output = compquant.save_quantized(model, tiny_tokenizer, tmp_path / "out", config=config, report=report,
                                      format=format)
    if format == "gptq":  # plain transformers needs GPTQ kernels (gptqmodel); compquant reads it densely
        reloaded = compquant.load_model(str(output)).model
    else:
        extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if format != "fake" else {}
        reloaded = AutoModelForCausalLM.from_pretrained(output, **extra).eval()
    ids = token_batches(2, 16, seed=9)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-4, atol=1e-4)
