"""lm-eval tasks on the in-memory model: local tasks in lm-eval's own format, run end to end.

The tasks are built here from files (a task YAML with `dataset_path: json`), so nothing needs
the hub. Our adapter is checked three ways: against a hand computation, against lm-eval's own
`simple_evaluate(model="hf")` on the same model saved to disk, and (for a LAMBADA-style task)
against our own fast LAMBADA path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from workbench.evaluate import _lambada, compare, encode_pair, evaluate, lambada_last_word, split_last_word
from workbench.lmeval import LMEvalTaskError

QUESTIONS = [
    ("the sky is", [" blue", " green", " loud"], 0),
    ("two plus two is", [" four", " five"], 0),
    ("cats say", [" woof", " meow", " moo", " quack"], 1),
    ("ice is", [" hot", " cold"], 1),
    ("the sun rises in the", [" west", " east", " north"], 1),
    ("fish live in", [" water", " trees"], 0),
    ("a week has seven", [" days", " years"], 0),
    ("snow is", [" black", " white"], 1),
]
PASSAGES = [
    "the cat sat on the mat",
    "she said hello to him and he replied with a quiet goodbye",
    "numbers 1 2 3 4 5 6 7 8 9 10 11 12",
    "trailing word here",
    "a much longer passage about nothing in particular, ending in a word",
]

MC_YAML = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# lambada_openai's own definition, on local files
LL_YAML = """task: toy_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

HUB_YAML = """task: toy_hub
dataset_path: nobody/not-on-this-machine
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_target: "{{label}}"
doc_to_choice: "{{choices}}"
"""


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmeval")
    folder = root / "tasks"
    folder.mkdir()
    mc = _write_jsonl(root / "mc.jsonl", [{"question": q, "choices": c, "label": label} for q, c, label in QUESTIONS])
    ll = _write_jsonl(root / "ll.jsonl", [{"text": text} for text in PASSAGES])
    (folder / "toy_mc.yaml").write_text(MC_YAML.format(data=mc))
    (folder / "toy_lambada.yaml").write_text(LL_YAML.format(data=ll))
    hub = root / "hub"
    hub.mkdir()
    (hub / "toy_hub.yaml").write_text(HUB_YAML)
    return root


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ours(model, chars, tasks_dir):
    return evaluate(model, chars, tasks=("lm-eval:toy_mc", "lm-eval:toy_lambada"),
                    include_path=tasks_dir / "tasks", batch_size=4)


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    start = len(context_ids)
    return sum(logprobs[start - 1 + k, token].item() for k, token in enumerate(continuation_ids))


def test_multiple_choice_items_by_hand(ours, model, chars):
    figures = ours["lm-eval:toy_mc"]
    assert figures["n"] == len(QUESTIONS) and figures["item_ids"] == list(range(len(QUESTIONS)))
    expected = []
    for question, choices, label in QUESTIONS:
        scores = [_loglikelihood(model, chars, question, choice) for choice in choices]
        expected.append(float(max(range(len(choices)), key=scores.__getitem__) == label))
    assert figures["items"]["accuracy"] == expected
    assert figures["accuracy"] == pytest.approx(sum(expected) / len(expected))
    assert figures["accuracy"] == pytest.approx(figures["lm_eval"]["acc"])  # lm-eval's own aggregate
    p, n = figures["accuracy"], figures["n"]
    assert figures["accuracy_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert "accuracy_norm" in figures and len(figures["accuracy_norm_ci"]) == 2


def test_loglikelihood_task_equals_our_lambada_path(ours, model, chars):
    figures = ours["lm-eval:toy_lambada"]
    fast = _lambada(model, chars, PASSAGES, 4, None, None, last_word=True)["lambada"]
    assert figures["items"]["accuracy"] == fast["items"]["accuracy"]
    assert figures["items"]["nll"] == pytest.approx(fast["items"]["nll"], rel=1e-5)
    assert figures["perplexity"] == pytest.approx(lambada_last_word(model, chars, PASSAGES)["perplexity"], rel=1e-5)
    assert figures["perplexity"] == pytest.approx(figures["lm_eval"]["perplexity"], rel=1e-6)
    low, high = figures["perplexity_ci"]
    assert low <= figures["perplexity"] <= high
    assert split_last_word(PASSAGES[0])[1] == " mat"


def test_same_items_as_lm_eval_from_a_saved_folder(ours, model, chars, tasks_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model.save_pretrained(tmp_path)
    chars.save_pretrained(tmp_path)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path}", tasks=["toy_mc", "toy_lambada"],
                             task_manager=TaskManager(include_path=str(tasks_dir / "tasks"), include_defaults=False),
                             device="cpu", batch_size=4, bootstrap_iters=0, log_samples=True)
    for task in ("toy_mc", "toy_lambada"):
        samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        mine = ours[f"lm-eval:{task}"]
        assert mine["item_ids"] == [s["doc_id"] for s in samples]
        assert mine["items"]["accuracy"] == [float(s["acc"]) for s in samples]
        if task == "toy_lambada":
            assert mine["items"]["nll"] == pytest.approx([-s["perplexity"] for s in samples], rel=1e-6)


def test_compare_pairs_lm_eval_items(ours, model, chars, tasks_dir):
    again = evaluate(model, chars, tasks=("lm-eval:toy_mc",), include_path=tasks_dir / "tasks", batch_size=4)
    table = compare({"lm-eval:toy_mc": ours["lm-eval:toy_mc"]}, again)
    row = table.iloc[0]
    assert row["metric"] == "lm-eval:toy_mc accuracy"
    assert row["difference"] == 0.0 and not row["significant"]


def test_limit_caps_documents(model, chars, tasks_dir):
    result = evaluate(model, chars, tasks=("lm-eval:toy_mc",), include_path=tasks_dir / "tasks", limit=3)
    assert result["lm-eval:toy_mc"]["n"] == 3 and result["lm-eval:toy_mc"]["item_ids"] == [0, 1, 2]


def test_data_dir_folder_is_an_include_path(model, chars, tasks_dir, tmp_path):
    (tmp_path / "lm-eval-tasks").symlink_to(tasks_dir / "tasks")
    result = evaluate(model, chars, tasks=("lm-eval:toy_mc",), data_dir=tmp_path, limit=2)
    assert result["lm-eval:toy_mc"]["n"] == 2


def test_unreachable_data_fails_fast_with_the_fix(model, chars, tasks_dir):
    message = r"'toy_hub' could not load its data \(nobody/not-on-this-machine\)"
    with pytest.raises(LMEvalTaskError, match=message) as err:
        evaluate(model, chars, tasks=("lm-eval:toy_hub",), include_path=tasks_dir / "hub")
    assert "--include-path" in str(err.value) and "dataset_path: json" in str(err.value)


def test_builtin_task_without_the_hub_names_the_task(model, chars):
    with pytest.raises(LMEvalTaskError, match="'hellaswag' could not load its data") as err:
        evaluate(model, chars, tasks=("lm-eval:hellaswag",), limit=2)
    assert "--include-path" in str(err.value)


def test_unknown_names_list_close_matches(model, chars):
    with pytest.raises(LMEvalTaskError, match="close matches: .*lm-eval:hellaswag"):
        evaluate(model, chars, tasks=("lm-eval:hellaswagg",))
    with pytest.raises(ValueError, match="lm-eval:hellaswag"):
        evaluate(model, chars, tasks=("hellaswag",))
    with pytest.raises(ValueError, match="close: zero-shot"):
        evaluate(model, chars, tasks=("zero-shott",))


def test_missing_include_path_is_named(model, chars, tmp_path):
    with pytest.raises(LMEvalTaskError, match="does not exist"):
        evaluate(model, chars, tasks=("lm-eval:toy_mc",), include_path=tmp_path / "nowhere")


def test_zero_shot_preset_expands_and_averages():
    from workbench.evaluate import _preset_mean, check_tasks

    names = check_tasks(["zero-shot"])
    assert names[-1] == "zero-shot" and len(names) == 8 and names[0] == "lm-eval:boolq"
    results = {name: {"items": {"accuracy": [1.0, 0.0] if i % 2 else [1.0, 1.0]}, "seconds": 1.0}
               for i, name in enumerate(names[:-1])}
    mean = _preset_mean("zero-shot", results)
    assert mean["accuracy"] == pytest.approx((4 * 1.0 + 3 * 0.5) / 7) and len(mean["tasks"]) == 7


def test_cli_evaluates_a_local_lm_eval_task(model, chars, tasks_dir, tmp_path, capsys):
    from workbench.cli import main

    model.save_pretrained(tmp_path)
    chars.save_pretrained(tmp_path)
    assert main(["evaluate", "--model", str(tmp_path), "--task", "lm-eval:toy_mc", "--include-path",
                 str(tasks_dir / "tasks"), "--limit", "4", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])["results"]["lm-eval:toy_mc"]
    assert report["n"] == 4 and len(report["items"]["accuracy"]) == 4 and len(report["accuracy_ci"]) == 2
    assert main(["evaluate", "--model", str(tmp_path), "--task", "lm-eval:toy_hub", "--include-path",
                 str(tasks_dir / "hub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # lm-eval may log warnings before it
    assert err.startswith("error: ") and "toy_hub" in err and "--include-path" in err


# --- bounded memory, progress, the installed task list -------------------------------------------

# single-token choices: lm-eval scores every choice of a question from one forward pass
ONE_TOKEN_YAML = """task: toy_letters
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def letters_dir(tasks_dir) -> Path:
    folder = tasks_dir / "letters"
    folder.mkdir(exist_ok=True)
    rows = [{"question": q + " ", "choices": ["a", "b", "c", "d"], "label": i % 4} for i, (q, _, _) in
            enumerate(QUESTIONS)]
    data = _write_jsonl(tasks_dir / "letters.jsonl", rows)
    (folder / "toy_letters.yaml").write_text(ONE_TOKEN_YAML.format(data=data))
    return folder


def _lm(model, chars, bounded: bool, batch_size: int = 3):
    from lm_eval.models.huggingface import HFLM

    from workbench.lmeval import _bounded_lm_class

    return (_bounded_lm_class() if bounded else HFLM)(pretrained=model, tokenizer=chars, batch_size=batch_size)


def test_bounded_log_likelihoods_equal_lm_evals_own(model, chars, monkeypatch):
    from workbench import evaluate as ev

    monkeypatch.setattr(ev, "LOGITS_CHUNK_BYTES", 4 * 128 * 5)  # 5 positions per head chunk, 128-token vocabulary
    assert ev._positions_per_chunk(model) == 5
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 60, (n,), generator=generator).tolist()

    context = tokens(9)
    requests = [(None, tokens(1 + i % 7), tokens(1 + i % 13)) for i in range(20)]  # lengths across chunks
    requests += [(None, context, [t]) for t in (5, 6, 7)]  # one forward pass, three answers
    bounded = _lm(model, chars, True)
    requests += [(None, tokens(bounded.max_length), tokens(4))]  # truncated from the left
    theirs = _lm(model, chars, False)._loglikelihood_tokens(requests, disable_tqdm=True)
    ours = bounded._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
    assert [logprob for logprob, _ in ours] == pytest.approx([logprob for logprob, _ in theirs], rel=1e-5, abs=1e-5)

    # A group whose members split context and continuation at different points: each one-token
    # member is scored at the last position (lm-eval's own gather reads the group's first one).
    mixed = [(None, context, [t]) for t in (5, 6, 7)] + [(None, context[:-2], context[-2:] + [8])]
    with torch.no_grad():
        after_context = torch.log_softmax(model(torch.tensor([context])).logits[0, -1].float(), -1)
        whole = torch.log_softmax(model(torch.tensor([context + [8]])).logits[0].float(), -1)
    expected = [after_context[t].item() for t in (5, 6, 7)]
    expected.append(sum(whole[len(context) - 3 + k, t].item() for k, t in enumerate(context[-2:] + [8])))
    scored = bounded._loglikelihood_tokens(mixed, disable_tqdm=True)
    assert [logprob for logprob, _ in scored] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_bounded_path_gives_the_same_items_on_local_tasks(model, chars, tasks_dir, letters_dir):
    from workbench.lmeval import run_tasks

    paths = [tasks_dir / "tasks", letters_dir]
    names = ["toy_mc", "toy_lambada", "toy_letters"]
    bounded = run_tasks(model, chars, names, include_path=paths, batch_size=4)
    full = run_tasks(model, chars, names, include_path=paths, batch_size=4, full_logits=True)
    for name in names:
        assert bounded[name]["item_ids"] == full[name]["item_ids"]
        assert bounded[name]["items"].keys() == full[name]["items"].keys()
        for metric, values in full[name]["items"].items():
            assert bounded[name]["items"][metric] == pytest.approx(values, rel=1e-5), (name, metric)


def test_progress_names_each_task_and_counts_its_requests(model, chars, tasks_dir):
    from workbench.lmeval import run_tasks

    reports: list[tuple[float, str]] = []
    run_tasks(model, chars, ["toy_mc", "toy_lambada"], include_path=tasks_dir / "tasks", batch_size=4,
              progress=lambda fraction, message: reports.append((fraction, message)))
    messages = [m for _, m in reports]
    assert messages[0] == "lm-eval task 1 of 2: toy_mc"
    assert "lm-eval task 2 of 2: toy_lambada" in messages
    choices = sum(len(c) for _, c, _ in QUESTIONS)
    assert f"lm-eval task 1 of 2: toy_mc ({choices}/{choices} requests)" in messages
    assert f"lm-eval task 2 of 2: toy_lambada ({len(PASSAGES)}/{len(PASSAGES)} requests)" in messages
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_an_error_raised_by_progress_stops_the_evaluation(model, chars, tasks_dir):
    from workbench.lmeval import run_tasks

    class Stop(Exception):
        pass

    seen = []

    def stop_at_first_batch(fraction: float, message: str) -> None:
        seen.append(message)
        if "requests)" in message:
            raise Stop

    with pytest.raises(Stop):
        run_tasks(model, chars, ["toy_mc", "toy_lambada"], include_path=tasks_dir / "tasks", batch_size=4,
                  progress=stop_at_first_batch)
    assert not any("toy_lambada" in m for m in seen)  # the second task never started


def test_task_list_is_built_once_then_read_from_its_file(tmp_path):
    from workbench.lmeval import TaskList, task_list_file

    first = TaskList(tmp_path)
    names = first.names(wait=None)
    assert {"hellaswag", "arc_easy", "boolq", "winogrande"} <= set(names) and len(names) > 1000
    assert names == sorted(names) and not first.from_file
    assert task_list_file(tmp_path).is_file() and "lm-eval-tasks-0.4" in task_list_file(tmp_path).name
    again = TaskList(tmp_path)
    assert again.names(wait=None) == names and again.from_file


def test_a_task_list_file_of_another_lm_eval_version_is_ignored(tmp_path):
    from workbench.lmeval import _read_task_list, _write_task_list, task_list_file

    path = task_list_file(tmp_path)
    _write_task_list(path, ["only_this"], 1.0)
    assert _read_task_list(path) == ["only_this"]
    path.write_text(json.dumps({"lm_eval": "0.0.1", "names": ["stale"]}))
    assert _read_task_list(path) is None
    path.write_text("{not json")
    assert _read_task_list(path) is None


def test_the_notebook_panel_lists_every_installed_task_once_indexed():
    import time

    pytest.importorskip("ipywidgets")
    from workbench.lmeval import installed_task_names
    from workbench.ui.widgets import Workbench

    panel = Workbench("default", eval_tasks=("lambada", "lm-eval:piqa"))
    assert installed_task_names(wait=None)  # the background index is done
    deadline = time.monotonic() + 60  # the panel's own thread fills the picker right after
    while "lm-eval:piqa" not in panel.eval_tasks.options and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "lm-eval:piqa" in panel.eval_tasks.options and "lm-eval:arc_easy" in panel.eval_tasks.options
    assert "lambada" in panel.eval_tasks.value
