"""``compquant quantize --nproc N`` and under torchrun: checked before the model loads, and the same
model as one process."""
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

import compquant
from compquant.cli import main
from compquant.core.checkpoint import finished_blocks
from compquant.core.plugin_manager import default_plugin_manager


def quantize_args(model_dir, data_dir, output, *extra):
    return ["quantize", str(model_dir), "--solver", "gptq", "--bits", "3", "--group-size", "32", "--nsamples", "4",
            "--seqlen", "16", "--batch-size", "2", "--stats-dtype", "float64", "--data-dir", str(data_dir),
            "--output", str(output), "-q", *extra]


def saved_tensors(folder):
    """Every tensor of an output, from however many shards."""
    return {name: tensor for shard in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(shard).items()}


def test_fewer_batches_than_ranks_are_refused_before_the_model_loads(model_dir, data_dir, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr("compquant.models.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(quantize_args(model_dir, data_dir, tmp_path / "out", "--nproc", "3")) == 2
    assert "2 calibration batches cannot be shared by 3 ranks" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_learner_on_several_ranks_is_refused_before_the_model_loads(model_dir, data_dir, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr("compquant.models.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(quantize_args(model_dir, data_dir, tmp_path / "out", "--learner", "lwc", "--nproc", "2")) == 2
    assert "learner 'lwc' runs on one process only, not on 2 ranks" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_nproc_under_torchrun_is_refused(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(quantize_args(model_dir, data_dir, tmp_path / "out", "--nproc", "2")) == 2
    assert "rank 0 of 2: --nproc launches the ranks itself; under torchrun leave it out" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--low-memory"]], ids=["in-memory", "low-memory"])
def test_nproc_2_saves_the_model_of_one_process(model_dir, data_dir, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(quantize_args(model_dir, data_dir, tmp_path / "one", *mode)) == 0
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    assert main(quantize_args(model_dir, data_dir, tmp_path / "two", "--nproc", "2", *mode)) == 0
    assert handlers == {number: signal.getsignal(number) for number in handlers}  # the launcher's are gone
    one, two = (saved_tensors(tmp_path / name) for name in ("one", "two"))
    assert one.keys() == two.keys() and any(key.endswith("weight_packed") for key in one)
    assert all(torch.equal(one[key], two[key]) for key in one)
    assert not list(tmp_path.glob(".*compquant-resume"))  # rank 0 removed the checkpoint once the output was saved


class StopAfterTheFirstBlock:
    @compquant.hookimpl
    def compquant_after_block(self, index, block, report):
        if index == 0:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_a_run_stopped_on_one_process_resumes_on_two_ranks_with_the_same_result(model_dir, data_dir, tmp_path,
                                                                                monkeypatch, capfd):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(quantize_args(model_dir, data_dir, tmp_path / "one")) == 0
    stopper = StopAfterTheFirstBlock()
    default_plugin_manager().register(stopper)
    try:
        assert main(quantize_args(model_dir, data_dir, tmp_path / "two")) == 130
    finally:
        default_plugin_manager().unregister(stopper)
    assert finished_blocks(tmp_path / ".two.compquant-resume") == 1
    capfd.readouterr()
    resumed = [item for item in quantize_args(model_dir, data_dir, tmp_path / "two", "--nproc", "2") if item != "-q"]
    assert main(resumed) == 0
    assert "1 finished blocks of model.layers reloaded" in capfd.readouterr().err  # by rank 0, as the others did
    one, two = (saved_tensors(tmp_path / name) for name in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)


@pytest.mark.slow
def test_a_failed_rank_stops_the_run_with_an_error_naming_it(model_dir, data_dir, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (model_dir / "model.safetensors").write_bytes(b"garbage")  # read by the ranks, after the launch
    assert main(quantize_args(model_dir, data_dir, tmp_path / "out", "--nproc", "2")) == 2
    err = capfd.readouterr().err
    assert re.search(r"error: rank [01] of 2: .*model.safetensors is truncated or corrupt", err)
    assert re.search(r"error: rank [01] of 2 failed first \(exit code 2; its error is above\)", err)
    assert not (tmp_path / "out").exists()
