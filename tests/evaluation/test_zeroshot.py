"""Zero-shot lm-eval tasks over the shared data folder's local copies: scores, prompts, errors, CLI."""
import gzip
import importlib.util
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from compquant.cli import main
from compquant.core.errors import CompquantError, DataNotFoundError
from compquant.evaluation.task_configs import build_tasks, local_tasks
from compquant.evaluation.zeroshot import DEFAULT_TASKS, zero_shot

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
FILES = {
    "piqa": "piqa/piqa.jsonl",
    "arc_easy": "arc_easy/arc_easy.jsonl",
    "arc_challenge": "arc_challenge/arc_challenge.jsonl",
    "hellaswag": "hellaswag/hellaswag_val.jsonl.gz",
    "winogrande": "winogrande/winogrande.jsonl",
    "lambada_openai": "lambada_openai/lambada_openai.jsonl",
    "boolq": "boolq/boolq.jsonl",
}
needs_shared_data = pytest.mark.skipif(
    not all((SHARED_DATA / file).is_file() for file in FILES.values()), reason="shared data not present"
)


def first_line(task: str) -> dict:
    path = SHARED_DATA / FILES[task]
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as lines:
        return json.loads(next(lines))


def expected_requests(task: str, line: dict) -> list[tuple[str, str]]:
    """(context, continuation) pairs that lm-eval's own task YAML builds for this document, written out
    from lm-eval's templates over the fields the local copy was made from."""
    if task == "piqa":  # "Question: {{goal}}\nAnswer:", choices [sol1, sol2]
        goal = line["query"].removeprefix("Question: ").removesuffix("\n")
        return [(f"Question: {goal}\nAnswer:", f" {choice}") for choice in line["choices"]]
    if task in ("arc_easy", "arc_challenge"):  # "Question: {{question}}\nAnswer:", choices.text
        question = line["query"].removeprefix("Question: ")
        return [(f"Question: {question}\nAnswer:", f" {choice}") for choice in line["choices"]]
    if task == "hellaswag":  # "{{query}}" over process_docs' query, endings as choices
        return [(line["query"], f" {choice}") for choice in line["choices"]]
    if task == "winogrande":  # partial evaluation: sentence[:blank] + option, then the rest of the sentence
        return [(context, f" {line['continuation']}") for context in line["context_options"]]
    if task == "lambada_openai":  # text.split(' ')[:-1] joined, ' ' + last word
        return [(line["context"], f" {line['continuation']}")]
    if task == "boolq":  # "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices no/yes
        passage, question = line["query"].removeprefix("Passage: ").rsplit("\nQuestion: ", 1)
        return [(f"{passage}\nQuestion: {question.removesuffix('?')}?\nAnswer:", f" {choice}") for choice in ("no", "yes")]
    raise AssertionError(task)


def test_every_local_task_has_a_file_and_the_defaults_are_local():
    assert set(local_tasks()) == set(FILES)
    assert set(DEFAULT_TASKS) <= set(local_tasks())


@needs_shared_data
@pytest.mark.parametrize("task", sorted(FILES))
def test_prompt_of_the_first_document_is_lm_evals(task):
    built = build_tasks([task], SHARED_DATA)[task]
    built.build_all_requests(limit=1)
    line = first_line(task)
    assert [request.arguments for request in built.instances] == expected_requests(task, line)
    doc = built.eval_docs[0]
    if task == "winogrande":  # the gold option is given by doc_to_text, the contexts being the choices
        assert built.doc_to_text(doc) == line["gold"]
    elif task != "lambada_openai":
        assert built.doc_to_target(doc) == line["gold"]


@needs_shared_data
@pytest.mark.parametrize("task", sorted(FILES))
def test_each_task_scores_the_limited_documents(task, make_llama, tiny_tokenizer):
    result = zero_shot(make_llama(), tiny_tokenizer, [task], data_dir=SHARED_DATA, limit=3, batch_size=4)
    score = result.scores[task]
    assert list(result.scores) == [task] and score.docs == 3 and result.limit == 3
    assert 0 <= score.acc <= 1 and score.acc_stderr is not None
    has_norm = task in ("piqa", "arc_easy", "arc_challenge", "hellaswag")
    assert (score.acc_norm is not None) == has_norm and (score.acc_norm is None or 0 <= score.acc_norm <= 1)
    assert (score.perplexity is not None) == (task == "lambada_openai")
    assert json.loads(json.dumps(result.to_dict()))["scores"][task]["docs"] == 3
    assert task in result.table()


@needs_shared_data
def test_data_folder_comes_from_the_environment_and_the_hub_stays_off_only_inside(make_llama, tiny_tokenizer, monkeypatch):
    import datasets.config

    monkeypatch.setenv("COMPQUANT_DATA_DIR", str(SHARED_DATA))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    offline_before = datasets.config.HF_HUB_OFFLINE
    result = zero_shot(make_llama(), tiny_tokenizer, "winogrande, piqa", limit=2)
    assert list(result.scores) == ["winogrande", "piqa"] and result.data_dir == str(SHARED_DATA)
    assert datasets.config.HF_HUB_OFFLINE == offline_before and "HF_HUB_OFFLINE" not in os.environ


def test_missing_data_file_names_the_file_and_the_fix(tmp_path, make_llama, tiny_tokenizer):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "piqa.jsonl").write_text("")
    with pytest.raises(DataNotFoundError, match=r"hellaswag: data file .*hellaswag/hellaswag_val\.jsonl\.gz does not exist.*--data-dir"):
        zero_shot(make_llama(), tiny_tokenizer, ["piqa", "hellaswag"], data_dir=tmp_path, limit=2)


def test_task_without_a_local_copy_lists_the_local_ones(tmp_path, make_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"no local copy of task 'mmlu'; local tasks: arc_challenge, .*winogrande"):
        zero_shot(make_llama(), tiny_tokenizer, "mmlu", data_dir=tmp_path)


def test_without_lm_eval_the_error_says_how_to_install_it(make_llama, tiny_tokenizer, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "lm_eval" else find_spec(name, *args))
    with pytest.raises(CompquantError, match=r"pip install 'compquant\[eval\]'"):
        zero_shot(make_llama(), tiny_tokenizer, "piqa", data_dir=SHARED_DATA)


# ------------------------------------------------------------------------ `compquant eval --tasks`
@needs_shared_data
def test_eval_tasks_prints_a_table_and_writes_json_without_perplexity(model_dir, tmp_path, capsys):
    output = tmp_path / "zs.json"
    assert main(["eval", str(model_dir), "--tasks", "piqa,lambada_openai", "--limit", "2",
                 "--data-dir", str(SHARED_DATA), "--json", str(output), "-q"]) == 0
    out = capsys.readouterr().out
    assert "piqa" in out and "lambada_openai" in out and "wikitext2 perplexity" not in out
    saved = json.loads(output.read_text())
    assert "windows" not in saved  # --tasks alone runs no perplexity
    assert {name: score["docs"] for name, score in saved["zeroshot"]["scores"].items()} == {"piqa": 2, "lambada_openai": 2}
    assert not (model_dir / "zeroshot.json").exists()  # not a compquant output folder


@needs_shared_data
def test_eval_tasks_with_explicit_ppl_runs_both_and_writes_beside_a_compquant_output(model_dir, data_dir, tmp_path):
    (model_dir / "compquant.json").write_text("{}")  # what marks a compquant output folder
    output = tmp_path / "both.json"
    data = tmp_path / "both-data"  # the wikitext fixture beside the real task files
    data.mkdir()
    for entry in (*data_dir.iterdir(), SHARED_DATA / "winogrande"):
        (data / entry.name).symlink_to(entry)
    assert main(["eval", str(model_dir), "--ppl", "wikitext2", "--seqlen", "16", "--tasks", "winogrande",
                 "--limit", "2", "--data-dir", str(data), "--json", str(output), "-q"]) == 0
    saved = json.loads(output.read_text())
    assert saved["windows"] == 2 and saved["zeroshot"]["scores"]["winogrande"]["docs"] == 2
    beside = json.loads((model_dir / "zeroshot.json").read_text())
    assert beside["model"] == str(model_dir) and beside["scores"]["winogrande"]["docs"] == 2


def test_eval_with_a_missing_task_file_fails_before_loading_the_model(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no-such-model"), "--tasks", "piqa", "--data-dir", str(tmp_path)]) == 2
    assert "piqa/piqa.jsonl does not exist" in capsys.readouterr().err
