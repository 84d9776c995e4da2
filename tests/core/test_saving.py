import copy

import pytest
import torch

import compquant
from compquant import QuantConfig
from compquant.core.errors import OutputPathError
from compquant.core.saving import check_output, write_text_atomic


def test_saved_model_reloads_with_the_same_logits(make_llama, tiny_tokenizer, token_batches, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_llama(tie=True)
    config = QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32})
    report = compquant.quantize(model, config, calibration=token_batches(4, 16))
    output = compquant.save_quantized(model, tiny_tokenizer, tmp_path / "out", config=config, report=report, format="fake")
    assert {"model.safetensors", "config.json", "compquant.json", "compquant_report.json"} <= {p.name for p in output.iterdir()}
    assert QuantConfig.load(output / "compquant.json") == config
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    ids = token_batches(2, 16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    assert output.stat().st_mode & 0o055  # readable by others, as a folder made with mkdir would be
    assert all(path.stat().st_mode & 0o044 for path in output.iterdir())  # and so is every file in it


def test_output_equal_to_or_inside_the_input_is_refused(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    for output in (source, source / "quantized"):
        with pytest.raises(OutputPathError, match="overwrite or nest"):
            check_output(output, source)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(OutputPathError, match="overwrite or nest"):
        check_output(tmp_path, gguf)


def test_existing_output_is_never_overwritten(tmp_path):
    (tmp_path / "done").mkdir()
    with pytest.raises(OutputPathError, match="already exists.*--overwrite"):
        check_output(tmp_path / "done", None)


def test_overwrite_replaces_only_an_earlier_compquant_output(make_llama, tmp_path):
    model = make_llama()
    config = QuantConfig(solver="rtn", grid={"bits": 8, "group_size": -1})
    report = compquant.quantize(model, config)
    first = compquant.save_quantized(model, None, tmp_path / "out", config=config, report=report, format="fake")
    (first / "stale.txt").write_text("from the first run")
    again = compquant.save_quantized(model, None, tmp_path / "out", config=config, report=report, format="fake",
                                     overwrite=True)
    assert again == first and not (again / "stale.txt").exists() and (again / "compquant.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputPathError, match="not a compquant output"):
        check_output(precious, None, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_too_little_free_space_is_refused_before_any_work(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 99, 1 << 20))
    with pytest.raises(OutputPathError, match="1 MiB free but this run needs about 10 MiB"):
        check_output(tmp_path / "out", None, needed_bytes=10 << 20)


def test_a_disk_filling_up_while_saving_leaves_nothing_behind(make_llama, tmp_path):
    import errno

    model = make_llama()

    class Exploding:
        def save_pretrained(self, folder):
            (folder / "half-written").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")

    report = compquant.quantize(model, QuantConfig(solver="rtn"))
    with pytest.raises(OutputPathError, match="filled up.*nothing was left behind"):
        compquant.save_quantized(model, Exploding(), tmp_path / "out", config=QuantConfig(solver="rtn"), report=report)
    assert list(tmp_path.iterdir()) == []


def test_atomic_text_write_replaces_whole_files(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "result.json", '{"a": 1}')
    write_text_atomic(path, '{"a": 2}')
    assert path.read_text() == '{"a": 2}'
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]
    assert path.stat().st_mode & 0o044


@pytest.mark.parametrize("broken", ["lm_head.weight", "model.norm.weight"])
def test_nan_in_the_input_is_named_before_any_work_and_nothing_is_written(model_dir, data_dir, tmp_path, capsys,
                                                                         broken):
    """NaN in the head or the final norm (which are not quantized) used to be saved with exit 0."""
    from safetensors.torch import load_file, save_file

    from compquant.cli import main

    tensors = load_file(model_dir / "model.safetensors")
    tensors[broken][:2] = float("nan")
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    output = tmp_path / "out"
    assert main(["quantize", str(model_dir), "--nsamples", "2", "--seqlen", "8", "--data-dir", str(data_dir),
                 "-o", str(output), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the input model") and f"NaN or Inf in {broken} (" in err and err.count("\n") == 1
    assert not output.exists() and not (tmp_path / ".out.compquant-resume").exists()
    assert main(["eval", str(model_dir), "--seqlen", "16", "--limit", "2", "--data-dir", str(data_dir), "-q"]) == 2
    assert "perplexity is nan: the model produced NaN or Inf logits" in capsys.readouterr().err


def test_non_finite_tensors_are_never_written(make_llama, tmp_path):
    model = make_llama()
    config = QuantConfig(solver="rtn", grid={"bits": 8, "group_size": -1})
    report = compquant.quantize(model, config)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(ArithmeticError, match=r"refusing to write the quantized model: NaN or Inf in model.norm.weight "
                                              r"\(1 value\)"):
        compquant.save_quantized(model, None, tmp_path / "out", config=config, report=report, format="fake")
    assert list(tmp_path.iterdir()) == []
