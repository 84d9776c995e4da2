"""Gemma 3: sandwich norms and ``1 + weight`` scales, and what they allow a rotation to do."""
from dataclasses import replace

import pytest
import torch
from torch import nn

import compquant
from compquant import QuantConfig
from compquant.core.errors import FunctionChangedError
from compquant.core.pipeline import apply_transforms
from compquant.core.plugin_manager import registry_for
from compquant.core.transform import TransformContext
from compquant.models.gemma import GEMMA3
from compquant.plugins.quarot import QuaRot


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def relative(after, before):
    return float((after - before).norm() / before.norm())


def test_adapter_names_exactly_the_blocks_linears_and_norms(make_gemma3):
    model = make_gemma3()
    assert registry_for(None).adapter_for(model) is GEMMA3
    for block in GEMMA3.block_list(model):
        linears = {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        assert set(GEMMA3.linears()) == linears
        norms = {name for name, module in block.named_modules() if type(module).__name__ == "Gemma3RMSNorm"}
        assert norms == {*GEMMA3.norms, *GEMMA3.output_norms, "self_attn.q_norm", "self_attn.k_norm"}


def test_the_residual_stream_is_not_rotated_through_an_uneven_sandwich_norm(make_gemma3, token_batches):
    model = make_gemma3()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    scales = model.model.layers[0].post_attention_layernorm.weight.detach() + 1
    message = (rf"model\.layers\.0\.post_attention_layernorm scales the normalised output of self_attn\.o_proj channel "
               rf"by channel \(its scales range from {float(scales.min()):.3g} to {float(scales.max()):.3g}\).*4 such "
               r"norms.*r1: false")
    for transform in ("quarot", "spinquant"):
        with pytest.raises(ValueError, match=message):
            compquant.quantize(model, QuantConfig(solver="rtn", transforms=[transform]), calibration=token_batches(2, 16))
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())  # nothing touched


def test_quarot_without_r1_keeps_the_function_of_uneven_sandwich_norms(make_gemma3, token_batches):
    model = make_gemma3()
    ids = token_batches(2, 24, seed=4)
    before = logits(model, ids)
    QuaRot().apply(model, GEMMA3, QuaRot().options({"r1": False, "r3": True}), TransformContext())
    assert relative(logits(model, ids), before) < 1e-5
    assert model.lm_head.weight is model.model.embed_tokens.weight  # no R1: nothing to untie


def test_quarot_folds_one_plus_weight_scales_and_leaves_unit_norms(make_gemma3, token_batches):
    model = make_gemma3(even_output_norms=True)
    ids = token_batches(2, 24, seed=4)
    before = logits(model, ids)
    QuaRot().apply(model, GEMMA3, QuaRot().options(), TransformContext())
    assert relative(logits(model, ids), before) < 1e-5
    for norm in (model.model.norm, *(b.get_submodule(n) for b in model.model.layers for n in GEMMA3.norms)):
        assert torch.all(norm.weight == 0)  # 1 + 0: the scale went into the readers


def test_the_function_check_catches_an_adapter_that_forgets_the_sandwich_norms(make_gemma3, token_batches):
    """An adapter that does not name the post norms would let R1 through them: the run stops."""
    forgetful = replace(GEMMA3, output_norms={})
    with pytest.raises(FunctionChangedError, match="transform 'quarot' changed the model's function"):
        apply_transforms(make_gemma3(), ["quarot"], registry_for(None), forgetful,
                         TransformContext(calibration=token_batches(2, 16)))
