import copy

import pytest
import torch
from torch import nn

from compquant.core.online import (
    OnlineOp,
    attach_attention_op,
    attach_input_op,
    describe_online_ops,
    online_ops,
    restore_online_ops,
)


class Negate(OnlineOp):
    def init_kwargs(self):
        return {}

    def forward(self, x):
        return -x


def test_input_ops_run_before_the_linear_and_round_trip_through_a_description():
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    plain = model(x)
    attach_input_op(model[0], Negate())
    torch.testing.assert_close(model(x), model[0].bias * 2 - plain)
    description = describe_online_ops(model)
    assert description == {"0": [{"site": "input", "class": f"{__name__}:Negate", "kwargs": {}}]}
    fresh = nn.Sequential(nn.Linear(4, 4))
    restore_online_ops(fresh, description)
    assert [type(op) for op in online_ops(fresh[0])] == [Negate]


def test_restoring_refuses_anything_but_input_ops():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="not a compquant OnlineOp"):
        restore_online_ops(model, {"0": [{"class": "os:system", "kwargs": {"command": "true"}}]})
    with pytest.raises(TypeError, match="must subclass"):
        attach_input_op(model[0], nn.ReLU())


class Reverse(OnlineOp):
    """Reverses the last dimension: a permutation, so orthogonal."""

    def init_kwargs(self):
        return {}

    def forward(self, x):
        return x.flip(-1)


def cached_keys(model, ids):
    with torch.no_grad():
        out = model(ids, use_cache=True)
    return out.logits, out.past_key_values.layers[0].keys


def test_query_and_key_ops_run_after_rope_and_the_cache_stores_the_transformed_keys(make_llama, token_batches):
    model = make_llama()
    ids = token_batches(2, 12, seed=1)
    reference, reference_keys = cached_keys(model, ids)
    attention = model.model.layers[0].self_attn
    attach_attention_op(model, attention, Reverse(), "key")
    one_sided, _ = cached_keys(model, ids)
    assert (one_sided - reference).abs().max() > 1e-3  # the key op runs: q·k changes until q turns too
    attach_attention_op(model, attention, Reverse(), "query")
    both, keys = cached_keys(model, ids)
    torch.testing.assert_close(both, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, reference_keys.flip(-1))  # post-RoPE keys, transformed, in the cache
    assert [type(op) for op in online_ops(attention, "query")] == [Reverse]


def test_attention_ops_round_trip_through_a_description(make_llama, token_batches):
    model = make_llama()
    for layer in model.model.layers:
        attach_attention_op(model, layer.self_attn, Reverse(), "query")
        attach_attention_op(model, layer.self_attn, Reverse(), "key")
    description = describe_online_ops(model)
    assert description["model.layers.1.self_attn"] == [
        {"site": site, "class": f"{__name__}:Reverse", "kwargs": {}} for site in ("query", "key")
    ]
    fresh = make_llama()
    restore_online_ops(fresh, description)
    assert describe_online_ops(fresh) == description
    ids = token_batches(1, 10, seed=2)
    torch.testing.assert_close(cached_keys(fresh, ids)[1], cached_keys(model, ids)[1])


def test_attention_ops_need_a_transformers_model_and_a_known_site(make_llama):
    model = make_llama()
    attention = model.model.layers[0].self_attn
    with pytest.raises(ValueError, match="'query' or 'key'"):
        attach_attention_op(model, attention, Reverse(), "value")
    with pytest.raises(TypeError, match="need a transformers model"):
        attach_attention_op(nn.Sequential(attention), attention, Reverse(), "query")


def test_a_deep_copy_runs_its_own_attention_ops(make_llama, token_batches):
    model = make_llama()
    for layer in model.model.layers:
        attach_attention_op(model, layer.self_attn, Reverse(), "key")
    copied = copy.deepcopy(model)
    for layer in copied.model.layers:
        attach_attention_op(copied, layer.self_attn, Reverse(), "key")  # reverses twice: the plain keys
    ids = token_batches(1, 10, seed=6)
    reference = make_llama()
    torch.testing.assert_close(cached_keys(copied, ids)[1], cached_keys(reference, ids)[1])
    torch.testing.assert_close(cached_keys(model, ids)[1], cached_keys(reference, ids)[1].flip(-1))
