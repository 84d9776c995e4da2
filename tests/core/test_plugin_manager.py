import inspect
import re
from pathlib import Path

import pytest
import torch

import compquant
from compquant.core import hookspecs
from compquant.core.errors import PluginConflictError, UnknownPluginError
from compquant.core.plugin_manager import build_registry, create_plugin_manager
from compquant.plugins.rtn import RTN

ROOT = Path(__file__).resolve().parents[2]
HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("compquant_")]


def test_builtins_register_through_the_hooks_with_their_provenance():
    registry = build_registry(create_plugin_manager(load_entry_points=False))
    assert {"rtn", "gptq"} <= set(registry.solvers)
    assert "llama" in registry.adapters
    entry = registry.solvers["gptq"]
    assert entry.plugin == "compquant.plugins.gptq" and "built-in" in entry.distribution


def test_unknown_name_lists_what_is_available():
    registry = build_registry(create_plugin_manager(load_entry_points=False))
    with pytest.raises(UnknownPluginError, match=r"unknown solver 'gptx'; available solvers: .*gptq.*rtn"):
        registry.solver("gptx")
    with pytest.raises(UnknownPluginError, match="unknown transform"):
        registry.transform("quarot-typo")


class Clashing:
    @compquant.hookimpl
    def compquant_register_solvers(self, register):
        register("gptq", RTN())


def test_a_clashing_registration_names_both_plugins():
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(Clashing(), name="clashing-plugin")
    with pytest.raises(PluginConflictError, match=r"compquant.plugins.gptq.*clashing-plugin"):
        build_registry(pm)


class WrongType:
    @compquant.hookimpl
    def compquant_register_solvers(self, register):
        register("not-a-solver", object())


def test_registering_the_wrong_type_is_refused():
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(WrongType(), name="wrong")
    with pytest.raises(TypeError, match="compquant.Solver"):
        build_registry(pm)


class Recorder:
    def __init__(self):
        self.calls = []

    @compquant.hookimpl
    def compquant_before_calibration(self, model, adapter, config):
        self.calls.append(("before_calibration", adapter.name))

    @compquant.hookimpl
    def compquant_after_layer(self, name, layer, result, report):
        assert torch.equal(layer.weight, result.weight)
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


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_tested_and_documented(hook):
    tests = "".join(path.read_text() for path in (ROOT / "tests").rglob("test_*.py") if path.name != "test_plugin_manager.py")
    here = Path(__file__).read_text().replace(hook + '", HOOKS', "")
    assert hook in tests or re.search(rf"def {hook}\(", here), f"{hook} has no test"
    assert hook in (ROOT / "README.md").read_text(), f"{hook} is not documented in README.md"
