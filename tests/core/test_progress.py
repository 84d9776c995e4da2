"""Progress off a terminal: a log line at a steady interval, with what is done, the time so far and
the time left (a batch job's log would otherwise be silent for minutes)."""
import logging

import pytest

import compquant
from compquant import QuantConfig
from compquant.core.progress import progress, progress_line


@pytest.fixture
def logged_progress(monkeypatch):
    monkeypatch.delenv("COMPQUANT_NO_PROGRESS", raising=False)
    monkeypatch.setenv("COMPQUANT_PROGRESS_SECONDS", "0")  # a line after every item


def test_off_a_terminal_progress_is_logged_with_the_time_left(logged_progress, caplog):
    with caplog.at_level(logging.INFO, logger="compquant.progress"):
        assert list(progress(range(3), desc="blocks", total=5, initial=2)) == [0, 1, 2]
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("blocks: 3 of 5 done, ") and "left" in lines[0]
    assert lines[-1].startswith("blocks: 5 of 5 done, ") and "left" not in lines[-1]


def test_the_line_reports_the_rate_of_this_run_only():
    assert progress_line(7, 30, 5, 20.0) == "7 of 30 done, 20s elapsed, about 3m50s left"
    assert progress_line(3, None, 0, 65.0) == "3 done, 1m05s elapsed"


def test_quantization_logs_block_k_of_n(logged_progress, make_llama, token_batches, caplog):
    with caplog.at_level(logging.INFO, logger="compquant.progress"):
        compquant.quantize(make_llama(), QuantConfig(solver="gptq", grid={"group_size": 32}), calibration=token_batches(2, 8))
    assert [record.getMessage().split(",")[0] for record in caplog.records] == ["gptq blocks: 1 of 2 done",
                                                                                "gptq blocks: 2 of 2 done"]


def test_evaluation_logs_windows_done_of_total(logged_progress, make_llama, tiny_tokenizer, data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="compquant.progress"):
        compquant.perplexity(make_llama(), tiny_tokenizer, seqlen=16, limit=3, data_dir=data_dir)
    assert caplog.records[-1].getMessage().startswith("perplexity wikitext2, batches of 1 windows: 3 of 3 done")
