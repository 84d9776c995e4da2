"""A third-party package adds a solver, a learner, a checkpoint format and a dataset through the `compquant`
entry-point group, with no change to compquant: installed for real with pip into a temporary
folder, then used by name from a config and end to end through the command line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compquant
from compquant.cli import main
from compquant.core.plugin_manager import build_registry, create_plugin_manager, default_plugin_manager, default_registry

from .conftest import CORPUS

PACKAGE = Path(__file__).parent / "external_plugin"
DISTRIBUTION = "compquant-example-plugin 0.1.0"
pytestmark = pytest.mark.slow  # runs pip


def _forget_the_default_registry():
    default_plugin_manager.cache_clear()
    default_registry.cache_clear()


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(PACKAGE)],
        check=True,
    )
    sys.path.insert(0, str(target))
    _forget_the_default_registry()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("compquant_example_plugin", None)
    _forget_the_default_registry()


def test_entry_point_plugin_registers_every_kind_with_its_distribution(installed_plugin):
    registry = build_registry(create_plugin_manager())
    for kind, name in (("solver", "per-row-nearest"), ("learner", "row-scale"), ("exporter", "example-codes"),
                       ("dataset", "example-corpus")):
        assert registry.table(kind)[name].distribution == DISTRIBUTION


def test_entry_point_solver_is_selected_by_name_from_a_config(installed_plugin, make_llama):
    model = make_llama()
    config = compquant.QuantConfig.model_validate({"solver": "per-row-nearest", "grid": {"bits": 4}})
    report = compquant.quantize(model, config, plugin_manager=create_plugin_manager())
    assert {layer.solver for layer in report.layers} == {"per-row-nearest"}
    weight = model.model.layers[0].mlp.down_proj.weight
    assert max(len(torch.unique(row)) for row in weight) <= 16


def test_entry_point_learner_trains_each_block_before_the_solver(installed_plugin, make_llama, token_batches):
    model = make_llama()
    config = compquant.QuantConfig.model_validate({"solver": "rtn", "learner": "row-scale",
                                                   "learner_options": {"epochs": 2, "lr": 1e-2},
                                                   "grid": {"bits": 3, "group_size": 32}})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16), plugin_manager=create_plugin_manager())
    assert [block.learner for block in report.blocks] == ["row-scale", "row-scale"]
    assert all(len(block.losses) == 2 for block in report.blocks)


def test_blocked_entry_point_is_not_loaded(installed_plugin, monkeypatch):
    monkeypatch.setenv("COMPQUANT_BLOCK_PLUGINS", "example")
    assert "per-row-nearest" not in build_registry(create_plugin_manager()).table("solver")


def test_its_exporter_and_dataset_work_end_to_end_through_the_cli(installed_plugin, model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "example-corpus").mkdir(parents=True)
    for purpose in ("calibration", "evaluation"):
        (data / "example-corpus" / f"{purpose}.txt").write_text(" ".join(CORPUS * 10))
    common = ["--solver", "gptq", "--bits", "4", "--group-size", "32", "--calib", "example-corpus",
              "--data-dir", str(data), "--nsamples", "4", "--seqlen", "16", "-q"]
    outputs = {fmt: tmp_path / fmt for fmt in ("example-codes", "fake")}
    for fmt, output in outputs.items():
        assert main(["quantize", str(model_dir), *common, "--format", fmt, "-o", str(output)]) == 0
    config = json.loads((outputs["example-codes"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compquant-example-codes"

    result = tmp_path / "ppl.json"
    assert main(["eval", str(outputs["example-codes"]), "--ppl", "example-corpus", "--data-dir", str(data),
                 "--seqlen", "16", "--json", str(result), "-q"]) == 0
    assert json.loads(result.read_text())["dataset"] == "example-corpus"
    read_back, fake = (compquant.load_model(str(output)).model for output in outputs.values())
    for ours, theirs in zip(read_back.state_dict().values(), fake.state_dict().values()):
        torch.testing.assert_close(ours, theirs)  # the plugin's reader gives back the quantized model

    capsys.readouterr()
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    for kind, name in (("exporter", "example-codes"), ("dataset", "example-corpus")):
        assert any(line.split()[:2] == [kind, name] and DISTRIBUTION in line for line in listing.splitlines())
