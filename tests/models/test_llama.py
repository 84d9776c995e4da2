import pytest
import torch
from torch import nn

import compquant
from compquant import QuantConfig
from compquant.models.llama import LLAMA


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
def test_adapter_names_exactly_the_blocks_linears(make_llama, family):
    model = make_llama(family)
    assert LLAMA.matches(model)
    for block in LLAMA.block_list(model):
        linears = {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        assert set(LLAMA.linears()) == linears
    for norm, readers in LLAMA.norms.items():
        assert all(isinstance(block.get_submodule(r), nn.Linear) for r in readers)
        assert "norm" in type(block.get_submodule(norm)).__name__.lower()


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_llama_family_relatives_quantize_end_to_end(make_llama, token_batches, family):
    model = make_llama(family)
    report = compquant.quantize(model, QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32}), calibration=token_batches(2, 16))
    assert len(report.layers) == 14


def test_tied_embeddings_stay_tied_and_full_precision(make_llama, token_batches):
    model = make_llama(tie=True)
    embedding = model.model.embed_tokens.weight.clone()
    compquant.quantize(model, QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 32}), calibration=token_batches(2, 16))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def test_adapter_does_not_claim_other_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert not LLAMA.matches(model)
    with pytest.raises(compquant.CompquantError, match="no registered adapter recognises a GPT2LMHeadModel"):
        compquant.quantize(model, QuantConfig(solver="rtn"))
