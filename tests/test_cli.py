"""The command line, in-process, on a tiny model folder and a tiny local data folder."""
import json
import re

import pytest
import torch

from compquant.cli import main


def quantize_args(model_dir, data_dir, output, *extra):
    return ["quantize", str(model_dir), "--solver", "gptq", "--bits", "3", "--group-size", "32", "--nsamples", "4",
            "--seqlen", "16", "--data-dir", str(data_dir), "--output", str(output), "-q", *extra]


def test_quantize_writes_model_config_and_report(model_dir, data_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(quantize_args(model_dir, data_dir, output, "--act-order", "--option", "percdamp=0.05",
                                    "--option", "static_groups=true")) == 0
    assert "saved gptq W3 model" in capsys.readouterr().out
    config = json.loads((output / "compquant.json").read_text())
    assert config["grid"]["bits"] == 3 and config["solver_options"] == {"act_order": True, "percdamp": 0.05, "static_groups": True}
    report = json.loads((output / "compquant_report.json").read_text())
    assert len(report["layers"]) == 14 and report["export"]["format"] == "compressed-tensors"
    assert json.loads((output / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert not list(tmp_path.glob(".*compquant-resume"))  # the resume checkpoint goes once the output is saved
    from compquant import load_model

    weight = load_model(str(output)).model.model.layers[0].self_attn.q_proj.weight
    assert max(len(torch.unique(row)) for row in weight[:, :32]) <= 8


def test_quantize_with_a_learner_before_gptq(model_dir, data_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(quantize_args(model_dir, data_dir, output, "--learner", "sde", "--learner-option", "epochs=2",
                              "--learner-option", "lookahead=1", "--format", "gptq")) == 0
    assert "saved sde+gptq W3 model" in capsys.readouterr().out
    config = json.loads((output / "compquant.json").read_text())
    assert config["learner"] == "sde" and config["learner_options"] == {"epochs": 2, "lookahead": 1}
    report = json.loads((output / "compquant_report.json").read_text())
    assert [len(block["losses"]) for block in report["blocks"]] == [2, 2]
    assert {layer["solver"] for layer in report["layers"]} == {"gptq"}


def test_config_file_is_overridden_by_options(model_dir, data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("solver: rtn\ngrid:\n  bits: 8\n  group_size: -1\n")
    output = tmp_path / "out"
    assert main(["quantize", str(model_dir), "--config", str(config), "--bits", "4", "-o", str(output), "-q",
                 "--transform", "quarot", "--transform-option", "quarot.r3=true", "--transform-option", "quarot.r2=false"]) == 0
    saved = json.loads((output / "compquant.json").read_text())
    assert saved["solver"] == "rtn" and saved["grid"] == {**saved["grid"], "bits": 4, "group_size": -1}
    assert saved["transform_options"] == {"quarot": {"r3": True, "r2": False}}


@pytest.mark.parametrize(
    "change, message",
    [
        (["--solver", "nope"], "unknown solver 'nope'"),
        (["--bits", "1"], "grid.bits"),
        (["--group-size", "0"], "group_size must be a positive number"),
        (["--option", "percdamp=-1"], "percdamp"),
        (["--transform", "quarot", "--transform-option", "r3=true"], "NAME.KEY=VALUE (e.g. quarot.r3=true)"),
        (["--transform", "quarot", "--transform-option", "quarot.r5=true"], "r5"),
        (["--transform-option", "quarot.r3=true"], "transform_options given for ['quarot'], which are not in transforms"),
    ],
)
def test_bad_inputs_are_clear_errors_and_write_nothing(model_dir, data_dir, tmp_path, capsys, change, message):
    output = tmp_path / "out"
    assert main(quantize_args(model_dir, data_dir, output, *change)) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_missing_data_file_is_a_clear_error_and_writes_nothing(model_dir, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    output = tmp_path / "out"
    (tmp_path / "no-data").mkdir()
    assert main(quantize_args(model_dir, tmp_path / "no-data", output)) == 2
    assert "wikitext-2/wiki.valid.tokens" in capsys.readouterr().err
    assert not output.exists()


def test_output_equal_to_the_input_is_refused(model_dir, data_dir, capsys):
    before = sorted(p.name for p in model_dir.iterdir())
    assert main(quantize_args(model_dir, data_dir, model_dir)) == 2
    assert "overwrite or nest" in capsys.readouterr().err
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_eval_prints_and_writes_perplexity(model_dir, data_dir, tmp_path, capsys):
    result = tmp_path / "ppl.json"
    assert main(["eval", str(model_dir), "--ppl", "wikitext2", "--seqlen", "16", "--limit", "3",
                 "--data-dir", str(data_dir), "--json", str(result), "-q"]) == 0
    assert "wikitext2 perplexity" in capsys.readouterr().out
    saved = json.loads(result.read_text())
    assert saved["windows"] == 3 and saved["perplexity"] > 1


def test_plugins_lists_kinds_names_and_distributions(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for kind, name in (("solver", "gptq"), ("solver", "rescomp"), ("transform", "quarot"), ("adapter", "llama")):
        assert re.search(rf"^{kind}\s+{name}\s+compquant\.\S+\s+compquant \(built-in\)$", out, re.M), (kind, name)


def test_eval_with_quarot_shows_the_rotation_preserves_perplexity(model_dir, data_dir, tmp_path):
    results = {}
    for transforms in ([], ["--transform", "quarot"]):
        path = tmp_path / f"ppl{len(transforms)}.json"
        assert main(["eval", str(model_dir), "--seqlen", "16", "--limit", "4", "--data-dir", str(data_dir),
                     "--json", str(path), "-q", *transforms]) == 0
        results[len(transforms)] = json.loads(path.read_text())["perplexity"]
    assert abs(results[2] - results[0]) / results[0] < 1e-3


def test_eval_takes_transform_options(model_dir, data_dir, tmp_path, capsys):
    path = tmp_path / "r3.json"
    assert main(["eval", str(model_dir), "--seqlen", "16", "--limit", "2", "--data-dir", str(data_dir), "--json", str(path),
                 "-q", "--transform", "quarot", "--transform-option", "quarot.r3=true"]) == 0
    assert json.loads(path.read_text())["transform_options"] == {"quarot": {"r3": True}}
    assert main(["eval", str(model_dir), "--transform-option", "spinquant.r3=true", "-q"]) == 2
    assert "transform_options given for ['spinquant'], which are not in transforms []" in capsys.readouterr().err


def test_auto_prefers_packed_gptq_v2_to_fake_and_fake_keeps_the_source_dtype(make_llama, tiny_tokenizer, data_dir,
                                                                            tmp_path, capsys, caplog):
    """Issue 17: W3 g128 SmolLM2 fell back to a float32 fake export twice the size of the float16
    original. Here: a group size that does not divide the widths (no compressed-tensors) and a zero
    point of 0 (no GPTQ v1) must give gptq-v2, and the float16 source must stay float16."""
    import logging

    from safetensors.torch import load_file

    model = make_llama()
    with torch.no_grad():  # a row whose first group is all non-negative gets a zero point of 0
        model.model.layers[0].mlp.up_proj.weight[0, :48].abs_()
    folder = tmp_path / "fp16"
    model.half().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    common = ["quantize", str(folder), "--solver", "rtn", "--bits", "4", "--group-size", "48", "--data-dir",
              str(data_dir)]
    with caplog.at_level(logging.INFO, logger="compquant"):
        assert main([*common, "-o", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr().out
    assert "auto: not exporting as compressed-tensors" in caplog.text and "auto: not exporting as gptq: " in caplog.text
    assert "auto: exporting as gptq-v2, the first format that can express the run" in caplog.text
    size = sum(path.stat().st_size for path in (tmp_path / "auto").iterdir())
    assert f"as gptq-v2 ({size / 1000:.1f} KB on disk, float16 tensors;" in out
    assert main([*common, "-o", str(tmp_path / "fake"), "--format", "fake", "-q"]) == 0
    tensors = load_file(tmp_path / "fake" / "model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}
    assert json.loads((tmp_path / "fake" / "config.json").read_text())["dtype"] == "float16"
    assert main([*common, "-o", str(tmp_path / "fake32"), "--format", "fake", "--dtype", "float32", "-q"]) == 0
    assert load_file(tmp_path / "fake32" / "model.safetensors")["lm_head.weight"].dtype == torch.float32
