"""Every bad input a new or careless user gave compquant (issue 17): exit status 2, one `error:`
line that names the problem and the fix, nothing written. Each case failed on the code before."""
import json
import os
import shutil
import signal

import pytest
import torch

import compquant
from compquant.cli import main
from compquant.core.plugin_manager import default_plugin_manager


def quantize(model, data_dir, output, *extra):
    return ["quantize", str(model), "--bits", "3", "--group-size", "32", "--nsamples", "2", "--seqlen", "16",
            "--data-dir", str(data_dir), "-o", str(output), "-q", *extra]


def refused(argv, capsys, *expected):
    """Run ``argv``; it must exit 2 with one error line holding every ``expected`` piece."""
    capsys.readouterr()  # what the test's own set-up printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a refused run gets as far as calibrating."""
    def calibrate(*args, **kwargs):
        raise AssertionError("the run started calibrating before refusing")

    monkeypatch.setattr("compquant.core.pipeline.calibrate", calibrate)


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if a refused run gets as far as loading the model."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before refusing")

    monkeypatch.setattr("compquant.models.loading.load_model", load_model)


def written(tmp_path, *names):
    return [name for name in names if (tmp_path / name).exists()]


# ------------------------------------------------------------------------------------- model files
def test_a_folder_with_a_config_and_no_weights(model_dir, data_dir, tmp_path, capsys):
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    refused(quantize(model_dir, data_dir, tmp_path / "out"), capsys, f"{model_dir} has a config.json but no weights")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_a_truncated_or_corrupt_safetensors_file_is_named(model_dir, data_dir, tmp_path, capsys, damage):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    refused(quantize(model_dir, data_dir, tmp_path / "out"), capsys, f"{weights} is truncated or corrupt",
            "download or copy it again")
    assert not (tmp_path / "out").exists()


def test_a_truncated_gguf_file_is_named(tmp_path, data_dir, capsys):
    import gguf
    import numpy as np

    (tmp_path / "gguf").mkdir()
    whole = tmp_path / "gguf" / "whole.gguf"
    writer = gguf.GGUFWriter(str(whole), "llama")
    writer.add_tensor("token_embd.weight", np.ones((300, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cut = tmp_path / "gguf" / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    refused(quantize(cut, data_dir, tmp_path / "out"), capsys, f"{cut} is not a readable GGUF file, most likely truncated",
            "download it again")


# ------------------------------------------------------------------------------------- config files
@pytest.mark.parametrize("name, text, expected", [
    ("run.yaml", "grid:\n  bits: [3\n", "is not valid YAML (line"),
    ("run.json", '{"grid": {"bits": 3,}}', "is not valid JSON (Expecting property name"),
    ("run.yaml", "grid: !!python/object:os.system {}\n", "a config holds only plain mappings"),
    ("run.yaml", None, "the config file must be a text file"),
])
def test_a_malformed_config_file_is_named_with_the_place(model_dir, data_dir, tmp_path, capsys, no_model, name, text,
                                                         expected):
    config = tmp_path / name
    config.write_bytes(text.encode() if text is not None else b"\xff\xfe\x00binary")
    line = refused(quantize(model_dir, data_dir, tmp_path / "out", "--config", str(config)), capsys, expected)
    assert str(config) in line


# ------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("extra, expected", [
    (["--adapter", "deit"], "adapter 'deit' does not fit this LlamaForCausalLM: it has no blocks at 'blocks'; drop "
                            "--adapter to use the detected one (llama)"),
    (["--group-size", "4096"], "group size 4096 is larger than every quantized linear's input width (the widest is 128)"),
])
def test_options_that_do_not_fit_the_model(model_dir, data_dir, tmp_path, capsys, no_work, extra, expected):
    refused(quantize(model_dir, data_dir, tmp_path / "out", *extra), capsys, expected)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.compquant-resume").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--device", "tpu"], "unknown device 'tpu'; use cpu, cuda or cuda:N"),
    (["--threads", "-1"], "argument --threads: expected a whole number of at least 1, got -1"),
    (["--threads", "0"], "argument --threads: expected a whole number of at least 1, got 0"),
    (["--option", "percdam=0.1"], "solver 'gptq': unknown option 'percdam' (the options there: act_order, blocksize, "
                                  "group_timing, percdamp, static_groups)"),
    (["--option", "percdamp=-1"], "solver 'gptq': option percdamp=-1: Input should be greater than or equal to 0"),
    (["--transform", "quarot", "--transform-option", "quarot.r5=true"],
     "transform 'quarot': unknown option 'r5' (the options there: fallback_random, r1, r2, r3, r4, rotation)"),
    (["--bits", "1"], "invalid configuration: option grid.bits=1: Input should be greater than or equal to 2"),
    (["--max-shard-size", "5XB"], "--max-shard-size '5XB' is not a size; write it as e.g. 5GB"),
    (["--learner", "lwc", "--learner-option", "epoch=3"],
     "learner 'lwc': unknown option 'epoch' (the options there: epochs, lambda_cl, lookahead, lr)"),
    (["--learner", "sde", "--learner-option", "lambda_cl=0.5"],
     "learner 'sde': lambda_cl weighs the cross-layer loss, which is off with lookahead 0"),
    (["--learner-option", "epochs=3"], "learner_options ['epochs'] are given but no learner"),
    (["--learner", "lwc", "--clip"], "which learner 'lwc' learns itself; drop --clip"),
    (["--learner", "omniquant"], "unknown learner 'omniquant'"),
])
def test_option_errors_name_the_option_and_the_fix_before_the_model_loads(model_dir, data_dir, tmp_path, capsys,
                                                                          no_model, extra, expected):
    line = refused(quantize(model_dir, data_dir, tmp_path / "out", *extra), capsys, expected)
    assert "validation error for" not in line and "Extra inputs" not in line


def test_quarot_without_a_hadamard_construction_names_the_option(tmp_path, tiny_tokenizer, data_dir, capsys, no_work):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=300, hidden_size=92, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    folder = tmp_path / "width-92"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    refused(quantize(folder, data_dir, tmp_path / "out", "--group-size", "-1", "--transform", "quarot"), capsys,
            "no Hadamard matrix of size 92", "set the QuaRot option fallback_random=true",
            "--transform-option quarot.fallback_random=true")


def test_a_binary_file_where_text_is_expected_is_named(model_dir, data_dir, tmp_path, capsys, no_model):
    valid = data_dir / "wikitext-2" / "wiki.valid.tokens"
    valid.write_bytes(b"\x00\x01\x02" * 100)
    refused(quantize(model_dir, data_dir, tmp_path / "out"), capsys, f"{valid} is a binary file")


def test_a_data_folder_that_does_not_exist(model_dir, tmp_path, capsys, no_model):
    refused(quantize(model_dir, tmp_path / "nowhere", tmp_path / "out"), capsys,
            f"the data folder {tmp_path / 'nowhere'} does not exist")


# ------------------------------------------------------------------------------------- formats before the work
@pytest.mark.parametrize("extra, expected", [
    (["--format", "gptq", "--bits", "5"], "format 'gptq' cannot express this run: GPTQ checkpoints hold 2, 3, 4, 8-bit "
                                          "weights, not 5-bit"),
    (["--format", "compressed-tensors", "--group-size", "48"], "has 64 input columns, not a multiple of the group size 48"),
    (["--format", "compressed-tensors", "--act-order"], "act-order groups out of column order"),
    (["--format", "gptq", "--transform", "quarot"], "online operations"),
])
def test_a_format_that_cannot_express_the_run_is_refused_before_calibration(model_dir, data_dir, tmp_path, capsys,
                                                                            no_work, extra, expected):
    refused(quantize(model_dir, data_dir, tmp_path / "out", *extra), capsys, expected, "Nothing was done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tiny-llama"]


# ------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("extra, expected", [
    (["--seqlen", "0"], "argument --seqlen: expected a whole number of at least 1, got 0"),
    (["--seqlen", "-5"], "argument --seqlen: expected a whole number of at least 1, got -5"),
    (["--limit", "-1"], "argument --limit: expected a whole number of at least 1, got -1"),
    (["--limit", "0"], "argument --limit: expected a whole number of at least 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: expected a whole number of at least 1, got 0"),
    (["--json", "."], "is a folder; name a file"),
    (["--json", "a-file.txt/result.json"], "cannot be written:"),
])
def test_eval_refuses_bad_numbers_and_unwritable_results_before_evaluating(model_dir, data_dir, tmp_path, capsys,
                                                                          monkeypatch, no_model, extra, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file.txt").write_text("not a folder")
    line = refused(["eval", str(model_dir), "--data-dir", str(data_dir), "-q", *extra], capsys, expected)
    assert "resum" not in line


def test_windows_longer_than_the_model_context_are_warned_about_with_both_numbers(model_dir, data_dir, caplog):
    assert main(["eval", str(model_dir), "--seqlen", "300", "--limit", "1", "--data-dir", str(data_dir), "-q"]) == 0
    assert "windows of 300 tokens are longer than the model's context of 256 tokens" in caplog.text


# ------------------------------------------------------------------------------------- interruptions
class StopAt:
    """Interrupts the run after the first block, as Ctrl-C or a scheduler's SIGTERM would."""

    def __init__(self, how):
        self.how = how

    @compquant.hookimpl
    def compquant_after_block(self, index, block, report):
        if index == 0:
            if self.how == "SIGINT":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("how, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_run_says_what_is_kept_and_how_to_resume(model_dir, data_dir, tmp_path, capsys, how, code):
    stopper = StopAt(how)
    default_plugin_manager().register(stopper)
    try:
        argv = quantize(model_dir, data_dir, tmp_path / "out")
        assert main(argv) == code
    finally:
        default_plugin_manager().unregister(stopper)
    err = capsys.readouterr().err.strip()
    resume = tmp_path / ".out.compquant-resume"
    assert err == (f"stopped by {how}; the 1 finished blocks are kept in {resume}. Resume with the same command: "
                   f"compquant {' '.join(argv)}")
    assert not (tmp_path / "out").exists() and (resume / "block_00000.safetensors").exists()
    assert main(argv) == 0  # and the same command does resume
    assert not resume.exists()


# ------------------------------------------------------------------------------------- the disk
def disk_full(monkeypatch, when):
    """safetensors' own error for a full disk, raised when the file written matches ``when``."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if when(str(filename)):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_disk_that_fills_during_the_checkpoint(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    disk_full(monkeypatch, lambda name: "block_00001" in name)
    refused(quantize(model_dir, data_dir, tmp_path / "out"), capsys, "No space left on device while writing",
            "block_00001.safetensors", "free space or fix the permissions, then run the same command again "
            "(finished blocks are kept and resumed)")
    assert not (tmp_path / "out").exists()


def test_a_disk_that_fills_during_the_final_write(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    disk_full(monkeypatch, lambda name: "shard-" in name)
    refused(quantize(model_dir, data_dir, tmp_path / "out"), capsys, "filled up while the model was written",
            "nothing was left behind")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*.partial"))


def test_the_free_space_check_does_not_count_the_existing_checkpoint_twice(model_dir, data_dir, tmp_path, capsys,
                                                                          monkeypatch):
    from compquant.core.checkpoint import checkpoint_bytes
    from compquant.core.saving import needed_bytes

    stopper = StopAt("SIGINT")
    default_plugin_manager().register(stopper)
    try:
        assert main(quantize(model_dir, data_dir, tmp_path / "out")) == 130
    finally:
        default_plugin_manager().unregister(stopper)
    capsys.readouterr()
    kept = checkpoint_bytes(tmp_path / ".out.compquant-resume")
    needed = needed_bytes(compquant.load_model(str(model_dir)).model, torch.float32, resume=True)
    free = needed - kept + 4096  # enough for the rest of the run, not for the checkpoint a second time
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))
    assert main(quantize(model_dir, data_dir, tmp_path / "out")) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------- the Python API
@pytest.mark.parametrize("ids, expected", [
    (torch.full((2, 8), 300), r"must lie in \[0, 300\) \(the model's vocabulary\), found ids from 300 to 300"),
    (torch.full((2, 8), -1), r"found ids from -1 to -1"),
    (torch.rand(2, 8), "must be an integer tensor, got torch.float32"),
    (torch.zeros(0, 8, dtype=torch.long), "the calibration inputs are empty"),
    (torch.zeros(8, dtype=torch.long), r"must be \(windows, tokens\), got shape \(8,\); for one window use ids.unsqueeze"),
])
def test_bad_calibration_ids_are_a_value_error_that_says_what_was_expected(make_llama, ids, expected):
    with pytest.raises(ValueError, match=expected):
        compquant.quantize(make_llama(), compquant.QuantConfig(solver="gptq", grid={"group_size": 32}), calibration=ids)


@pytest.mark.parametrize("options, expected", [
    ({"seqlen": 0}, "seqlen must be at least 2 tokens"),
    ({"seqlen": 16, "limit": 0}, "limit must be a positive number of windows"),
    ({"seqlen": 10_000}, "make no window of 10000; lower seqlen"),
])
def test_perplexity_refuses_impossible_windows_with_a_value_error(make_llama, tiny_tokenizer, data_dir, options,
                                                                  expected):
    with pytest.raises(ValueError, match=expected):
        compquant.perplexity(make_llama(), tiny_tokenizer, data_dir=data_dir, **options)
