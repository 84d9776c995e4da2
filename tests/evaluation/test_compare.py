"""`compquant compare`, the README's first command, on a tiny model: one table of full precision
against each solver, every row's perplexity what the model it names scores."""
import copy
import json

import pytest

import compquant
from compquant.cli import main
from compquant.evaluation.datasets import calibration_windows


def test_compare_prints_and_writes_fp_and_each_solver(model_dir, data_dir, tmp_path, capsys):
    output = tmp_path / "compare.json"
    argv = ["compare", str(model_dir), "--solvers", "rtn,gptq", "--bits", "4", "--group-size", "32",
            "--nsamples", "4", "--seqlen", "16", "--eval-seqlen", "16", "--eval-limit", "4",
            "--data-dir", str(data_dir), "--json", str(output), "-q"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "wikitext2 ppl" in table and "W4 g32 asym" in table and "gptq options: act_order=True" in table
    result = json.loads(output.read_text())
    assert [row["method"] for row in result["rows"]] == ["fp", "rtn", "gptq"]
    rows = {row["method"]: row for row in result["rows"]}

    loaded = compquant.load_model(str(model_dir))
    def ppl(model):
        return compquant.perplexity(model, loaded.tokenizer, seqlen=16, limit=4, data_dir=data_dir).perplexity

    assert rows["fp"]["perplexity"] == pytest.approx(ppl(loaded.model), rel=1e-6)
    config = compquant.QuantConfig(solver="gptq", grid={"bits": 4, "group_size": 32}, solver_options={"act_order": True},
                                   calibration={"nsamples": 4, "seqlen": 16})  # the main job's GPTQ has act-order
    quantized = copy.deepcopy(loaded.model)
    windows = calibration_windows(loaded.tokenizer, "wikitext2", nsamples=4, seqlen=16, seed=0, data_dir=data_dir)
    report = compquant.quantize(quantized, config, calibration=windows)
    assert rows["gptq"]["perplexity"] == pytest.approx(ppl(quantized), rel=1e-6)
    assert rows["gptq"]["mean_relative_error"] == pytest.approx(report.mean_relative_error, rel=1e-6)
    assert rows["rtn"]["mean_relative_error"] is None and rows["rtn"]["quantize_seconds"] > 0


def test_compare_checks_every_solver_before_loading_the_model(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "no-model"), "--solvers", "gptq,gptx"]) == 2
    assert "unknown solver 'gptx'" in capsys.readouterr().err
