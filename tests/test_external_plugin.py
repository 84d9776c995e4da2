"""A third-party package adds a solver through the `compquant` entry-point group, with no change to
compquant: installed for real with pip into a temporary folder, then selected by name."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compquant
from compquant.core.plugin_manager import build_registry, create_plugin_manager

PACKAGE = Path(__file__).parent / "external_plugin"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(PACKAGE)],
        check=True,
    )
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("compquant_example_solver", None)


def test_entry_point_plugin_is_registered_with_its_distribution(installed_plugin):
    registry = build_registry(create_plugin_manager())
    entry = registry.solvers["per-row-nearest"]
    assert entry.distribution == "compquant-example-solver 0.1.0"


def test_entry_point_solver_is_selected_by_name_from_a_config(installed_plugin, make_llama):
    model = make_llama()
    config = compquant.QuantConfig.model_validate({"solver": "per-row-nearest", "grid": {"bits": 4}})
    report = compquant.quantize(model, config, plugin_manager=create_plugin_manager())
    assert {layer.solver for layer in report.layers} == {"per-row-nearest"}
    weight = model.model.layers[0].mlp.down_proj.weight
    assert max(len(torch.unique(row)) for row in weight) <= 16


def test_blocked_entry_point_is_not_loaded(installed_plugin, monkeypatch):
    monkeypatch.setenv("COMPQUANT_BLOCK_PLUGINS", "example_solver")
    assert "per-row-nearest" not in build_registry(create_plugin_manager()).solvers
