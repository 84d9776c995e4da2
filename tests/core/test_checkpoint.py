"""Resume: a run killed part way restarts from its checkpoint and ends bit-identical."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import compquant
from compquant import QuantConfig
from compquant.core.checkpoint import ResumeMismatchError
from compquant.cli import main
from compquant.core.plugin_manager import create_plugin_manager


class Crash(Exception):
    pass


class CrashAt:
    """Stops the run inside a block, after some of its linears are done."""

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.quantized: list[str] = []

    @compquant.hookimpl
    def compquant_after_layer(self, name, layer, result, report):
        self.quantized.append(name)
        if name == self.layer:
            raise Crash(name)


def run(make_llama, token_batches, config, resume_dir, plugin=None):
    model = make_llama(seed=3)
    pm = create_plugin_manager()
    if plugin is not None:
        pm.register(plugin)
    report = compquant.quantize(model, config, calibration=token_batches(4, 16), plugin_manager=pm,
                                resume_dir=resume_dir)
    return model, report


@pytest.mark.parametrize("solver, options", [("gptq", {"act_order": True}), ("rescomp", {"base": "gptaq"})])
def test_resumed_run_is_bit_identical_and_redoes_only_unfinished_blocks(make_llama, token_batches, tmp_path, solver,
                                                                          options):
    config = QuantConfig(solver=solver, solver_options=options, grid={"bits": 3, "group_size": 32})
    reference, reference_report = run(make_llama, token_batches, config, None)
    crash = CrashAt("model.layers.1.mlp.gate_proj")
    with pytest.raises(Crash):
        run(make_llama, token_batches, config, tmp_path / "resume", crash)
    watch = CrashAt("never")
    model, report = run(make_llama, token_batches, config, tmp_path / "resume", watch)
    assert all(name.startswith("model.layers.1.") for name in watch.quantized) and len(watch.quantized) == 7
    for (name, expected), (_, actual) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(expected, actual), name
    assert [layer.name for layer in report.layers] == [layer.name for layer in reference_report.layers]
    for name, record in reference_report.records.items():
        assert torch.equal(report.records[name].codes, record.codes)
        assert torch.equal(report.records[name].scale, record.scale)


def test_a_checkpoint_of_another_run_is_refused_with_what_changed(make_llama, token_batches, tmp_path):
    config = QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 32})
    with pytest.raises(Crash):
        run(make_llama, token_batches, config, tmp_path / "resume", CrashAt("model.layers.1.self_attn.q_proj"))
    changed = config.model_copy(update={"grid": config.grid.model_copy(update={"bits": 4})})
    with pytest.raises(ResumeMismatchError, match="different config.grid.bits.*delete that folder"):
        run(make_llama, token_batches, changed, tmp_path / "resume")
    other_model = make_llama(seed=4)
    with pytest.raises(ResumeMismatchError, match="different model"):
        compquant.quantize(other_model, config, calibration=token_batches(4, 16), resume_dir=tmp_path / "resume")


KILLER = textwrap.dedent("""
    import os, signal, sys
    import compquant
    from compquant.cli import main
    from compquant.core.plugin_manager import default_plugin_manager

    class KillInBlock:
        @compquant.hookimpl
        def compquant_after_layer(self, name, layer, result, report):
            if name == os.environ["KILL_AT"]:
                os.kill(os.getpid(), signal.SIGKILL)

    if os.environ.get("KILL_AT"):
        default_plugin_manager().register(KillInBlock())
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # spawns interpreters
def test_sigkill_in_the_middle_of_a_block_then_the_same_command_resumes(model_dir, data_dir, tmp_path):
    folder = model_dir
    script = tmp_path / "run.py"
    script.write_text(KILLER)

    def command(output):
        return [sys.executable, str(script), "quantize", str(folder), "--solver", "gptaq", "--bits", "3",
                "--group-size", "32", "--nsamples", "4", "--seqlen", "16", "--data-dir", str(data_dir),
                "--output", str(output), "--format", "fake", "-q", "--threads", "1"]

    environment = {**os.environ, "COMPQUANT_NO_PROGRESS": "1"}
    killed = subprocess.run(command(tmp_path / "out"), env={**environment, "KILL_AT": "model.layers.1.self_attn.o_proj"},
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.compquant-resume" / "block_00000.safetensors").exists()
    resumed = subprocess.run(command(tmp_path / "out"), env=environment, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not (tmp_path / ".out.compquant-resume").exists()
    threads = torch.get_num_threads()
    try:  # the uninterrupted run, in this process (same code path, one interpreter start less)
        assert main(command(tmp_path / "straight")[2:]) == 0
    finally:
        torch.set_num_threads(threads)
    expected, actual = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_a_block_written_by_another_configuration_is_never_reloaded(make_llama, token_batches, tmp_path):
    """Issue 17's mixed folder: a W3 run's checkpoint whose block 0 a W4 run wrote (its fingerprint
    file and progress say W3). The block's own fingerprint gives it away."""
    import shutil

    w3 = QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 32})
    w4 = w3.model_copy(update={"grid": w3.grid.model_copy(update={"bits": 4})})
    for config, folder in ((w3, "w3"), (w4, "w4")):
        with pytest.raises(Crash):
            run(make_llama, token_batches, config, tmp_path / folder, CrashAt("model.layers.1.self_attn.q_proj"))
    shutil.copy(tmp_path / "w4" / "block_00000.safetensors", tmp_path / "w3" / "block_00000.safetensors")
    with pytest.raises(ResumeMismatchError, match=r"block_00000.safetensors in the checkpoint was written by a run with "
                                                  r"a different model, data or config.*delete .*w3 to start over"):
        run(make_llama, token_batches, w3, tmp_path / "w3")


def test_nan_in_a_solvers_input_is_blamed_on_the_input_and_leaves_no_resume_folder(make_llama, token_batches,
                                                                                      tmp_path):
    class BreakBlockOne:  # a plugin that breaks the model after the input check, before block 1 is solved
        @compquant.hookimpl
        def compquant_after_block(self, index, block, report):
            if index == 0:
                with torch.no_grad():
                    model.model.layers[1].mlp.up_proj.weight[0, :3] = float("nan")

    model = make_llama(seed=3)
    pm = create_plugin_manager()
    pm.register(BreakBlockOne())
    with pytest.raises(ArithmeticError, match=r"NaN or Inf in model.layers.1.mlp.up_proj.weight \(3 values\) before "
                                              r"quantization \(the solver's input\)"):
        compquant.quantize(model, QuantConfig(solver="gptq", grid={"bits": 3, "group_size": 32}),
                           calibration=token_batches(4, 16), plugin_manager=pm, resume_dir=tmp_path / "resume")
    assert not (tmp_path / "resume").exists()  # block 0 was checkpointed, then discarded: resuming cannot help
