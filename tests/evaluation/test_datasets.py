import sys
from pathlib import Path

import pytest

from compquant.core.errors import DataNotFoundError, UnknownPluginError
from compquant.evaluation.datasets import calibration_windows, load_text

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_local_folder_from_argument_or_environment(data_dir, monkeypatch):
    from_argument = load_text("wikitext2", "evaluation", data_dir_=data_dir)
    monkeypatch.setenv("COMPQUANT_DATA_DIR", str(data_dir))
    assert load_text("wikitext2", "evaluation") == from_argument
    assert "Test article" in from_argument


def test_calibration_reads_the_validation_split_never_the_test_split(data_dir, tiny_tokenizer):
    windows = calibration_windows(tiny_tokenizer, "wikitext2", nsamples=6, seqlen=12, seed=0, data_dir=data_dir)
    assert windows.shape == (6, 12)
    text = tiny_tokenizer.decode(windows.flatten())
    assert "Test article" not in text and "tower" not in text  # test-split words
    assert "<unk>" not in load_text("wikitext2", "calibration", data_dir_=data_dir)
    assert "guest-starring" in load_text("wikitext2", "calibration", data_dir_=data_dir)


def test_calibration_windows_depend_only_on_the_seed(data_dir, tiny_tokenizer):
    draw = lambda seed: calibration_windows(tiny_tokenizer, "wikitext2", nsamples=4, seqlen=8, seed=seed, data_dir=data_dir)
    assert draw(0).equal(draw(0)) and not draw(0).equal(draw(1))


def test_missing_file_offline_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub loader
    with pytest.raises(DataNotFoundError, match=r"wikitext-2-raw/wiki.test.raw.*COMPQUANT_DATA_DIR"):
        load_text("wikitext2", "evaluation", data_dir_=tmp_path)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UnknownPluginError, match="unknown dataset 'c4x'; available datasets: wikitext2"):
        load_text("c4x", "evaluation")


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").is_file(), reason="shared data not present")
def test_real_wikitext2_test_split_has_the_hub_rows():
    text = load_text("wikitext2", "evaluation", data_dir_=SHARED_DATA)
    assert len(text.split("\n\n")) == 4358
