import copy
import json
import sys

import pytest
import torch
from torch import nn

import compquant
from compquant.core.errors import ModelLoadError
from compquant.core.online import (
    OnlineOp,
    attach_attention_op,
    attach_input_op,
    describe_online_ops,
    online_ops,
    restore_online_ops,
)
from compquant.core.plugin_manager import create_plugin_manager, registry_for
from compquant.core.registry import PluginRegistry


class Negate(OnlineOp):
    def options(self):
        return self.Options()

    def forward(self, x):
        return -x


class Reverse(OnlineOp):
    """Reverses the last dimension: a permutation, so orthogonal."""

    def options(self):
        return self.Options()

    def forward(self, x):
        return x.flip(-1)


class TestOps:
    @compquant.hookimpl
    def compquant_register_online_ops(self, register):
        register("negate", Negate)
        register("reverse", Reverse)


@pytest.fixture(scope="module")
def registry() -> PluginRegistry:
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(TestOps())
    return registry_for(pm)


def test_input_ops_run_before_the_linear_and_round_trip_through_a_description(registry):
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    plain = model(x)
    attach_input_op(model[0], Negate())
    torch.testing.assert_close(model(x), model[0].bias * 2 - plain)
    description = describe_online_ops(model, registry)
    assert description == {"0": [{"site": "input", "op": "negate", "options": {}}]}
    fresh = nn.Sequential(nn.Linear(4, 4))
    restore_online_ops(fresh, description, registry)
    assert [type(op) for op in online_ops(fresh[0])] == [Negate]


def test_only_online_ops_can_be_attached_and_only_registered_types_described(registry):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="must subclass"):
        attach_input_op(model[0], nn.ReLU())

    class Unregistered(Negate):
        pass

    attach_input_op(model[0], Unregistered())
    with pytest.raises(compquant.CompquantError, match="Unregistered is not a registered online_op.*register it"):
        describe_online_ops(model, registry)


def test_a_registration_must_be_an_online_op_class():
    class Bad:
        @compquant.hookimpl
        def compquant_register_online_ops(self, register):
            register("bad", Negate())  # an instance, not the class

    pm = create_plugin_manager(load_entry_points=False)
    pm.register(Bad())
    with pytest.raises(TypeError, match="must be a subclass of compquant.OnlineOp"):
        registry_for(pm)


@pytest.mark.parametrize("spec", [{"class": "this:Zen", "kwargs": {}}, {"op": "this", "options": {}},
                                  {"class": "os:system", "kwargs": {"command": "true"}}])
def test_a_description_naming_any_module_imports_nothing(registry, spec, capsys):
    sys.modules.pop("this", None)
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ModelLoadError, match="not an online op type any installed plugin registers.*registered: hadamard, negate, "
                                             "reverse.*nothing named in a checkpoint is imported"):
        restore_online_ops(model, {"0": [spec]}, registry, "ops.json")
    assert "this" not in sys.modules and "Beautiful is better" not in capsys.readouterr().out


def test_a_module_file_beside_the_checkpoint_never_runs(model_dir, monkeypatch):
    marker = model_dir / "ran.txt"
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "import compquant\nclass Op(compquant.OnlineOp):\n    pass\n")
    (model_dir / "compquant_online_ops.json").write_text(json.dumps(
        {"model.layers.0.mlp.down_proj": [{"site": "input", "class": "evil:Op", "kwargs": {}}]}))
    monkeypatch.syspath_prepend(str(model_dir))  # as when compquant runs from inside the folder
    with pytest.raises(ModelLoadError, match=r"compquant_online_ops.json, model.layers.0.mlp.down_proj: 'evil:Op' is not"):
        compquant.load_model(str(model_dir))
    assert not marker.exists() and "evil" not in sys.modules


@pytest.mark.parametrize("options, message", [
    ({"n": 1_000_000_007}, "a Hadamard of size 1000000007 cannot turn tensors of width 128"),
    ({"n": 128, "m": 2}, "unknown option 'm' .*the options there: n"),
    ({"n": "many"}, "option n='many': Input should be a valid integer"),
])
def test_recorded_op_options_are_validated_against_their_site(make_llama, options, message):
    model = make_llama()
    description = {"model.layers.0.mlp.down_proj": [{"site": "input", "op": "hadamard", "options": options}]}
    with pytest.raises(ModelLoadError, match=message):
        restore_online_ops(model, description, registry_for(None), "ops.json")
    assert online_ops(model.model.layers[0].mlp.down_proj) == []


def test_files_written_before_the_registry_still_load_their_registered_ops(make_llama):
    from compquant.plugins.hadamard import OnlineHadamard

    model = make_llama()
    legacy = {"model.layers.0.mlp.down_proj": [{"class": "compquant.plugins.hadamard:OnlineHadamard", "kwargs": {"n": 128}}]}
    restore_online_ops(model, legacy, registry_for(None))
    assert [op.n for op in online_ops(model.model.layers[0].mlp.down_proj)] == [128]
    assert isinstance(online_ops(model.model.layers[0].mlp.down_proj)[0], OnlineHadamard)


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


def test_attention_ops_round_trip_through_a_description(make_llama, token_batches, registry):
    model = make_llama()
    for layer in model.model.layers:
        attach_attention_op(model, layer.self_attn, Reverse(), "query")
        attach_attention_op(model, layer.self_attn, Reverse(), "key")
    description = describe_online_ops(model, registry)
    assert description["model.layers.1.self_attn"] == [
        {"site": site, "op": "reverse", "options": {}} for site in ("query", "key")
    ]
    fresh = make_llama()
    restore_online_ops(fresh, description, registry)
    assert describe_online_ops(fresh, registry) == description
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
