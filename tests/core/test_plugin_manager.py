import inspect
from pathlib import Path

import pytest
import torch

import compquant
from compquant.core import hookspecs
from compquant.core.errors import PluginConflictError, UnknownHookError, UnknownPluginError
from compquant.core.plugin_manager import build_registry, create_plugin_manager
from compquant.plugins.rtn import RTN

ROOT = Path(__file__).resolve().parents[2]
HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("compquant_")]


def test_builtins_register_through_the_hooks_with_their_provenance():
    registry = build_registry(create_plugin_manager(load_entry_points=False))
    assert {"rtn", "gptq"} <= set(registry.table("solver"))
    assert "llama" in registry.table("adapter")
    entry = registry.table("solver")["gptq"]
    assert entry.plugin == "compquant.plugins.gptq" and "built-in" in entry.distribution


def test_the_built_in_learners_register_as_their_own_kind():
    registry = build_registry(create_plugin_manager(load_entry_points=False))
    assert {name: entry.plugin for name, entry in registry.table("learner").items()} == {
        "lwc": "compquant.plugins.lwc", "lsi": "compquant.plugins.sde", "sde": "compquant.plugins.sde"}


def test_unknown_name_lists_what_is_available():
    registry = build_registry(create_plugin_manager(load_entry_points=False))
    with pytest.raises(UnknownPluginError, match=r"unknown solver 'gptx'; available solvers: .*gptq.*rtn"):
        registry.get("solver", "gptx")
    with pytest.raises(UnknownPluginError, match="unknown transform"):
        registry.get("transform", "quarot-typo")


class Clashing:
    @compquant.hookimpl
    def compquant_register_solvers(self, register):
        register("gptq", RTN())


def test_a_clashing_registration_names_both_plugins():
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(Clashing(), name="clashing-plugin")
    with pytest.raises(PluginConflictError, match=r"solver 'gptq' is registered twice: by plugin '(compquant.plugins.gptq|clashing-plugin)'.* and by plugin '(clashing-plugin|compquant.plugins.gptq)'"):
        build_registry(pm)


class WrongType:
    @compquant.hookimpl
    def compquant_register_solvers(self, register):
        register("not-a-solver", object())


class WrongLearner:
    @compquant.hookimpl
    def compquant_register_learners(self, register):
        register("not-a-learner", RTN())


@pytest.mark.parametrize("plugin, expected", [(WrongType(), "compquant.Solver"), (WrongLearner(), "compquant.Learner")])
def test_registering_the_wrong_type_is_refused(plugin, expected):
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="wrong")
    with pytest.raises(TypeError, match=expected):
        build_registry(pm)


class Recorder:
    def __init__(self):
        self.calls = []

    @compquant.hookimpl
    def compquant_before_calibration(self, model, adapter, config):
        self.calls.append(("before_calibration", adapter.name))

    @compquant.hookimpl
    def compquant_after_layer(self, name, layer, result, layer_report, report):
        assert torch.equal(layer.weight, result.weight)
        assert report.layers[-1] is layer_report and layer_report.name == name
        self.calls.append(("after_layer", name))

    @compquant.hookimpl
    def compquant_after_block(self, index, block, report):
        self.calls.append(("after_block", index))

    @compquant.hookimpl
    def compquant_after_calibration(self, model, report, config):
        self.calls.append(("after_calibration", len(report.layers)))


def test_lifecycle_hooks_are_called_in_order(make_llama, token_batches):
    pm = create_plugin_manager(load_entry_points=False)
    recorder = Recorder()
    pm.register(recorder)
    config = compquant.QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32})
    compquant.quantize(make_llama(), config, calibration=token_batches(4, 16), plugin_manager=pm)
    kinds = [call[0] for call in recorder.calls]
    assert kinds[0] == "before_calibration" and kinds[-1] == "after_calibration"
    assert recorder.calls[-1] == ("after_calibration", 14)
    assert kinds.count("after_layer") == 14 and kinds.count("after_block") == 2
    assert recorder.calls[1] == ("after_layer", "model.layers.0.self_attn.q_proj")
    assert recorder.calls[8] == ("after_block", 0)


class EveryHook:
    """Implements every hook in the specs, recording which were called."""

    def __init__(self):
        self.called = set()


for _hook in HOOKS:
    def _record(self, _hook=_hook):
        self.called.add(_hook)

    setattr(EveryHook, f"record_{_hook}", compquant.hookimpl(specname=_hook)(_record))


def test_every_hook_is_called_by_a_quantize_and_save(make_llama, token_batches, tmp_path):
    pm = create_plugin_manager(load_entry_points=False)
    recorder = EveryHook()
    pm.register(recorder)
    config = compquant.QuantConfig(solver="gptq", transforms=["quarot"], grid={"bits": 4, "group_size": 32})
    model = make_llama()
    report = compquant.quantize(model, config, calibration=token_batches(4, 16), plugin_manager=pm)
    compquant.save_quantized(model, None, tmp_path / "out", config=config, report=report, plugin_manager=pm)
    assert recorder.called == set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    assert f"`{hook}(" in (ROOT / "docs" / "plugins.md").read_text(), f"{hook} is not documented in docs/plugins.md"


def test_a_misspelt_hook_is_an_error_at_start_up_naming_plugin_and_hook(tmp_path, monkeypatch):
    (tmp_path / "misspelt_plugin.py").write_text(
        "import compquant\n\n@compquant.hookimpl\ndef compquant_register_solver(register):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownHookError, match=r"plugin 'misspelt_plugin' implements 'compquant_register_solver', "
                                               r"which is not a compquant hook .*compquant_register_solvers"):
        create_plugin_manager(builtins=("misspelt_plugin",), load_entry_points=False)
