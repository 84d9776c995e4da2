"""``compquant quantize --nproc N`` and under torchrun: checked before the model loads, and the same
model as one process."""
import pytest
import torch
from safetensors.torch import load_file

from compquant.cli import main


def quantize_args(model_dir, data_dir, output, *extra):
    return ["quantize", str(model_dir), "--solver", "gptq", "--bits", "3", "--group-size", "32", "--nsamples", "4",
            "--seqlen", "16", "--batch-size", "2", "--stats-dtype", "float64", "--data-dir", str(data_dir),
            "--output", str(output), "-q", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nproc", "2", "--low-memory"], "--low-memory runs on one process, not on 2 ranks"),
        (["--nproc", "3"], "2 calibration batches cannot be shared by 3 ranks"),
    ],
)
def test_a_run_on_ranks_that_cannot_work_is_refused_before_the_model_loads(model_dir, data_dir, tmp_path, capsys,
                                                                           monkeypatch, extra, message):
    monkeypatch.setattr("compquant.models.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(quantize_args(model_dir, data_dir, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_nproc_under_torchrun_is_refused(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(quantize_args(model_dir, data_dir, tmp_path / "out", "--nproc", "2")) == 2
    assert "rank 0 of 2: --nproc launches the ranks itself; under torchrun leave it out" in capsys.readouterr().err


def test_nproc_2_saves_the_model_of_one_process(model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(quantize_args(model_dir, data_dir, tmp_path / "one")) == 0
    assert main(quantize_args(model_dir, data_dir, tmp_path / "two", "--nproc", "2")) == 0
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys() and any(key.endswith("weight_packed") for key in one)
    assert all(torch.equal(one[key], two[key]) for key in one)
    assert not list(tmp_path.glob(".*compquant-resume"))  # rank 0 removed the checkpoint once the output was saved
