"""A transform that breaks its promise to keep the model's function is caught at run time."""
import pytest
import torch

import compquant
from compquant.core.errors import FunctionChangedError
from compquant.core.function_check import FunctionCheck, default_tolerance, probe_input
from compquant.core.online import OnlineOp, attach_attention_op
from compquant.core.pipeline import apply_transforms
from compquant.core.plugin_manager import registry_for
from compquant.core.plugin_manager import create_plugin_manager
from compquant.core.transform import Transform, TransformContext, TransformOptions
from compquant.models.llama import LLAMA


class Reverse(OnlineOp):
    def forward(self, x):
        return x.flip(-1)


class KeysOnly(Transform):
    """The R3 bug in miniature: keys turned, queries not, so q·kᵀ changes."""

    def apply(self, model, adapter, options, context):
        attach_attention_op(model, model.model.layers[0].self_attn, Reverse(), "key")


class ScaleOneWeight(Transform):
    class Options(TransformOptions):
        factor: float = 2.0

    def apply(self, model, adapter, options, context):
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(options.factor)


class Broken:
    @compquant.hookimpl
    def compquant_register_transforms(self, register):
        register("keys-only", KeysOnly())
        register("scale-one-weight", ScaleOneWeight())


@pytest.fixture
def plugin_manager():
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(Broken(), name="broken-transforms")
    return pm


def config(transform, **extra):
    return compquant.QuantConfig(solver="rtn", transforms=[transform], grid={"bits": 4, "group_size": 32}, **extra)


def test_a_one_sided_key_rotation_stops_the_run_naming_the_transform(make_llama, token_batches, plugin_manager):
    model = make_llama()
    with pytest.raises(FunctionChangedError, match=r"transform 'keys-only' changed the model's function: .* moved by"):
        compquant.quantize(model, config("keys-only"), calibration=token_batches(4, 16), plugin_manager=plugin_manager)
    assert len(torch.unique(model.model.layers[0].self_attn.q_proj.weight[0])) > 16  # stopped before quantizing


def test_the_check_can_be_turned_off(make_llama, token_batches, plugin_manager):
    report = compquant.quantize(make_llama(), config("keys-only", transform_check=False),
                                calibration=token_batches(4, 16), plugin_manager=plugin_manager)
    assert len(report.layers) == 14


def test_the_tolerance_decides(make_llama, token_batches, plugin_manager):
    small = {"transform_options": {"scale-one-weight": {"factor": 1.0001}}}
    compquant.quantize(make_llama(), config("scale-one-weight", **small), calibration=token_batches(4, 16),
                       plugin_manager=plugin_manager)
    with pytest.raises(FunctionChangedError, match="tolerance 1e-06"):
        compquant.quantize(make_llama(), config("scale-one-weight", transform_tolerance=1e-6, **small),
                           calibration=token_batches(4, 16), plugin_manager=plugin_manager)


def test_quarot_and_r3_pass_the_check(make_llama, token_batches):
    model = make_llama(tie=True)
    check = FunctionCheck.start(model, LLAMA, token_batches(4, 16))
    apply_transforms(model, ["quarot"], registry_for(None), LLAMA, TransformContext(),
                     {"quarot": {"r3": True}}, check=False)
    assert check.verify(model, "quarot") < 1e-5


def test_without_calibration_a_seeded_random_window_is_the_probe(make_llama, plugin_manager):
    model = make_llama()
    probe = probe_input(model, None)
    assert probe.shape == (1, 128) and int(probe.max()) < model.config.vocab_size
    assert torch.equal(probe, probe_input(model, None))
    with pytest.raises(FunctionChangedError, match="keys-only"):
        apply_transforms(model, ["keys-only"], registry_for(plugin_manager), LLAMA, TransformContext())


def test_probe_is_the_first_calibration_window_cut_to_128_tokens(make_llama, token_batches):
    calibration = token_batches(4, 300)
    assert torch.equal(probe_input(make_llama(), calibration), calibration[:1, :128])
    assert default_tolerance(torch.float32) < default_tolerance(torch.bfloat16)
