"""Evaluation: batch-size invariance, an independent LAMBADA check, and the bundled model's figures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from tiny_models import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from workbench.evaluate import (
    compare,
    encode_pair,
    evaluate,
    lambada_last_word,
    last_token_accuracy,
    perplexity,
    split_last_word,
)
from workbench.intervals import perplexity_summary

PASSAGES = [
    "the cat sat on the mat",
    "a much longer passage about nothing in particular, ending in a word",
    "short one",
    "she said hello to him and he replied with a quiet goodbye",
    "x y",
    "numbers 1 2 3 4 5 6 7 8 9 10 11 12",
    "trailing word here",
]
LONG_TEXT = " ".join(PASSAGES * 6)


@pytest.fixture(scope="module", params=["llama", "gpt2", "opt", "bloom"])
def tiny(request):
    return tiny_model(request.param)


def test_split_last_word():
    assert split_last_word("the cat sat") == ("the cat", " sat")
    assert split_last_word("one") == ("", " one")


def test_encode_pair_moves_trailing_spaces(chars):
    context, target = encode_pair(chars, "ab ", "cd")
    assert context == chars.encode("ab", add_special_tokens=False)
    assert target == chars.encode(" cd", add_special_tokens=False)


@pytest.mark.parametrize("metric", [lambada_last_word, last_token_accuracy])
def test_lambada_metrics_ignore_batch_size(tiny, chars, metric):
    results = [metric(tiny, chars, PASSAGES, batch_size=size) for size in (1, 3, 8)]
    for result in results[1:]:
        for key in ("accuracy", "perplexity"):
            if key in result:
                assert result[key] == pytest.approx(results[0][key], rel=1e-5, abs=1e-6)
        assert result["n"] == len(PASSAGES)


def test_perplexity_ignores_batch_size(tiny, chars):
    results = [perplexity(tiny, chars, LONG_TEXT, seqlen=48, batch_size=size) for size in (1, 3, 8)]
    assert results[0]["windows"] == len(LONG_TEXT) // 48
    for result in results[1:]:
        assert result["perplexity"] == pytest.approx(results[0]["perplexity"], rel=1e-5)


def test_perplexity_by_hand(chars):
    model = tiny_model("llama")
    ids = chars(LONG_TEXT).input_ids
    seqlen, windows = 40, 3
    nlls = []
    for w in range(windows):
        window = torch.tensor([ids[w * seqlen : (w + 1) * seqlen]])
        with torch.no_grad():
            logits = model(window).logits[0]
        nlls.append(F.cross_entropy(logits[:-1], window[0, 1:]).item())
    result = perplexity(model, chars, LONG_TEXT, seqlen=seqlen, limit=windows)
    assert result["windows"] == windows and result["tokens"] == windows * seqlen
    assert result["perplexity"] == pytest.approx(math.exp(sum(nlls) / windows), rel=1e-5)


def _last_word_by_hand(model, tokenizer, text):
    """Score the target one token at a time with a growing prefix: no batching, no padding."""
    context, target = text.rsplit(" ", 1)
    context_ids = tokenizer.encode(context)
    target_ids = tokenizer.encode(context + " " + target)[len(context_ids) :]
    prefix, loglikelihood, greedy = list(context_ids), 0.0, True
    for token in target_ids:
        with torch.no_grad():
            logits = model(torch.tensor([prefix])).logits[0, -1]
        loglikelihood += torch.log_softmax(logits.float(), -1)[token].item()
        greedy &= int(logits.argmax()) == token
        prefix.append(token)
    return loglikelihood, greedy


def _last_token_by_hand(model, tokenizer, text):
    ids = tokenizer(text).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0, -1]
    return int(logits.argmax()) == ids[-1]


def _check_against_hand(model, tokenizer, texts):
    by_hand = [_last_word_by_hand(model, tokenizer, t) for t in texts]
    result = lambada_last_word(model, tokenizer, texts, batch_size=4)
    assert result["accuracy"] == pytest.approx(sum(g for _, g in by_hand) / len(texts))
    expected_ppl = math.exp(-sum(ll for ll, _ in by_hand) / len(texts))
    assert result["perplexity"] == pytest.approx(expected_ppl, rel=1e-4)
    hits = sum(_last_token_by_hand(model, tokenizer, t) for t in texts)
    assert last_token_accuracy(model, tokenizer, texts, batch_size=4)["accuracy"] == pytest.approx(hits / len(texts))
    return result


def test_last_word_definition_by_hand_tiny(chars):
    _check_against_hand(tiny_model("llama"), chars, PASSAGES)


def test_evaluate_tasks_and_limit(chars, data_dir):
    model = tiny_model("llama")
    results = evaluate(model, chars, tasks=("lambada", "lambada-last-token", "wikitext2"), limit=3,
                       data_dir=data_dir, seqlen=64, batch_size=2)
    assert set(results) == {"lambada", "lambada-last-token", "wikitext2"}
    assert results["lambada"]["n"] == 3 and results["lambada-last-token"]["n"] == 3
    assert results["wikitext2"]["windows"] == 3
    alone = evaluate(model, chars, tasks=("lambada-last-token",), limit=3, data_dir=data_dir)
    assert alone["lambada-last-token"]["accuracy"] == results["lambada-last-token"]["accuracy"]
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, chars, tasks=("mmlu",))


def test_a_new_task_is_a_loader_and_one_table_entry(chars, monkeypatch):
    from workbench import evaluate as ev
    from workbench.sweep import SweepConfig, default_evaluator

    loads = []

    def load_toy(settings):
        loads.append(settings.limit)
        return LONG_TEXT

    toy = ev.Task(load_toy, ev._score_perplexity, labels={"perplexity": "toy-text perplexity"},
                  dataset="toy text", unit="window")
    monkeypatch.setitem(ev.TASKS, "toy", toy)
    assert "toy" in ev.task_names() and ev.check_tasks(["toy"]) == ["toy"]
    assert ev.dataset_name("toy") == "toy text" and ev.windowed("toy") and not ev.windowed("lambada")
    model = tiny_model("llama")
    dense = evaluate(model, chars, tasks=("toy",), limit=2, seqlen=16)
    assert dense["toy"]["windows"] == 2 and loads == [2]
    table = compare(dense, dense)
    assert table["metric"].tolist() == ["toy-text perplexity (16-token windows, no per-window BOS (SparseGPT/Wanda))"]
    # a sweep sizes a window task by its ppl_windows and eval_seqlen, not by its limit
    config = SweepConfig(tasks=("toy",), limit=5, ppl_windows=3, eval_seqlen=16)
    assert default_evaluator(chars, config)(model)["toy"]["windows"] == 3


def test_table_entries_and_presets():
    from workbench import evaluate as ev

    assert ev.task_for("lm-eval:hellaswag") is ev.TASKS[ev.LM_EVAL_PREFIX]
    assert ev.task_for("lm-eval:") is None and ev.task_for("zero-shot") is None
    assert ev.task_names()[:4] == ["lambada", "lambada-last-token", "wikitext2", "zero-shot"]
    assert "lm-eval:" not in ev.task_names() and ev.dataset_name("lm-eval:boolq") == "lm-eval:boolq"
    assert ev.metric_label("lambada-last-token", "accuracy") == "LAMBADA last-token accuracy"
    assert ev.metric_label("lm-eval:boolq", "accuracy") == "lm-eval:boolq accuracy"
    with pytest.raises(ValueError, match="choose from lambada, lambada-last-token, wikitext2, zero-shot"):
        ev.check_tasks(["lambda"])


def test_progress_callback(chars):
    seen = []
    lambada_last_word(tiny_model("llama"), chars, PASSAGES, batch_size=3, progress=lambda f, m: seen.append(f))
    assert seen and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)


def test_compare_table():
    dense = {"lambada": {"accuracy": 0.5, "perplexity": 20.0, "n": 10}, "wikitext2": {"perplexity": 30.0}}
    sparse = {"lambada": {"accuracy": 0.45, "perplexity": 25.0, "n": 10}, "wikitext2": {"perplexity": 33.0}}
    table = compare(dense, sparse)
    assert list(table.columns) == ["metric", "dense", "sparse", "relative drop (%)"]
    assert list(table["metric"]) == ["LAMBADA last-word accuracy", "LAMBADA last-word perplexity",
                                     "WikiText-2 perplexity"]
    assert table["relative drop (%)"].tolist() == pytest.approx([-10.0, 25.0, 10.0])
    flat = compare({"accuracy": 0.7917}, {"accuracy": 0.8038})  # the seed's first row: +1.53%
    assert flat["relative drop (%)"][0] == pytest.approx(1.528, abs=1e-3)


@pytest.mark.slow
def test_bundled_last_word_matches_hand_computation(bundled, data_dir):
    from workbench.data import load_lambada

    texts = load_lambada(data_dir, limit=6)
    _check_against_hand(bundled.model, bundled.tokenizer, texts)


@pytest.mark.slow
def test_bundled_lambada_subset(bundled, data_dir):
    results = evaluate(bundled.model, bundled.tokenizer, tasks=("lambada", "lambada-last-token"), limit=100,
                       data_dir=data_dir)
    # full set: last word ~0.29 (instruct model, 4-bit weights)
    assert 0.15 <= results["lambada"]["accuracy"] <= 0.45
    assert 10 < results["lambada"]["perplexity"] < 200
    assert 0.3 <= results["lambada-last-token"]["accuracy"] <= 0.8


@pytest.mark.slow
def test_bundled_wikitext2_subset(bundled, data_dir):
    result = evaluate(bundled.model, bundled.tokenizer, tasks=("wikitext2",), limit=6, data_dir=data_dir)
    assert result["wikitext2"]["windows"] == 6
    assert 20 < result["wikitext2"]["perplexity"] < 50  # full set ~29-35


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward does not take `logits_to_keep` (older or custom models)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_lambada_scores_the_same_without_logits_to_keep(chars):
    model = tiny_model("llama")
    wrapped = _NoLogitsToKeep(model)
    for metric in (lambada_last_word, last_token_accuracy):
        fast, full = metric(model, chars, PASSAGES, batch_size=4), metric(wrapped, chars, PASSAGES, batch_size=4)
        assert fast["accuracy"] == full["accuracy"]
        if "perplexity" in fast:
            assert fast["perplexity"] == pytest.approx(full["perplexity"], rel=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces (parameters are not outputs)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel() * value.element_size())
        return out


def _largest_while(fn):
    with _LargestTensor() as mode:
        result = fn()
    return result, mode.largest


def _big_vocab_model(vocab: int):
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=vocab)
    return T.AutoModelForCausalLM.from_config(config).eval()


def test_large_vocabulary_evaluates_in_bounded_memory(chars, monkeypatch):
    import workbench.evaluate as evaluation

    budget = 4 * 2**20
    monkeypatch.setattr(evaluation, "LOGITS_CHUNK_BYTES", budget)
    seqlen, windows = 32, 2
    largest = {}
    for vocab in (49_152, 262_144):
        model = _big_vocab_model(vocab)
        result, largest[vocab] = _largest_while(
            lambda m=model: perplexity(m, chars, LONG_TEXT, seqlen=seqlen, batch_size=2, limit=windows))
        # the numbers equal the unchunked path: full logits, by hand
        ids = torch.tensor(chars(LONG_TEXT).input_ids[: windows * seqlen]).view(windows, seqlen)
        full, full_largest = _largest_while(lambda m=model, x=ids: m(x).logits)
        nll = [F.cross_entropy(full[w, :-1], ids[w, 1:]).item() for w in range(windows)]
        assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / windows), rel=1e-5)
        assert result["items"]["nll"] == pytest.approx(nll, rel=1e-5)
        # the unchunked path really is bigger: windows x seqlen x vocab float32 logits
        assert full_largest >= windows * seqlen * vocab * 4
        words, words_largest = _largest_while(lambda m=model: lambada_last_word(m, chars, PASSAGES, batch_size=8))
        assert words_largest <= budget
    assert largest[262_144] <= budget < windows * seqlen * 262_144 * 4
    assert largest[262_144] <= 1.25 * largest[49_152]


def test_per_window_bos_by_hand():
    from conftest import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.bos_token = "<eos>"  # id 1: a BOS token for this test
    model = tiny_model("llama")
    ids = tokenizer(LONG_TEXT, add_special_tokens=False).input_ids
    seqlen, windows = 40, 3
    nlls = []
    for w in range(windows):
        window = torch.tensor([[1] + ids[w * (seqlen - 1) : (w + 1) * (seqlen - 1)]])
        with torch.no_grad():
            logits = model(window).logits[0]
        nlls.append(F.cross_entropy(logits[:-1], window[0, 1:]).item())
    result = perplexity(model, tokenizer, LONG_TEXT, seqlen=seqlen, limit=windows, bos_per_window=True)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nlls) / windows), rel=1e-5)
    assert "BOS at the start of every window" in result["convention"]
    default = perplexity(model, tokenizer, LONG_TEXT, seqlen=seqlen, limit=windows)
    assert "SparseGPT/Wanda" in default["convention"] and default["perplexity"] != result["perplexity"]


def test_per_window_bos_needs_a_bos_token(chars):
    with pytest.raises(ValueError, match="BOS"):
        perplexity(tiny_model("llama"), chars, LONG_TEXT, seqlen=40, bos_per_window=True)


def test_results_keep_items_and_intervals(chars, data_dir):
    results = evaluate(tiny_model("llama"), chars, tasks=("lambada", "lambada-last-token", "wikitext2"), limit=4,
                       data_dir=data_dir, seqlen=64)
    lambada = results["lambada"]
    assert len(lambada["items"]["accuracy"]) == 4 and lambada["item_ids"] == [0, 1, 2, 3]
    assert lambada["accuracy"] == pytest.approx(sum(lambada["items"]["accuracy"]) / 4)
    assert lambada["perplexity"] == pytest.approx(math.exp(sum(lambada["items"]["nll"]) / 4))
    wiki = results["wikitext2"]
    assert len(wiki["items"]["nll"]) == 4 and wiki["perplexity_ci"][0] <= wiki["perplexity"] <= wiki["perplexity_ci"][1]
    assert "no per-window BOS" in wiki["convention"]


def test_compare_with_intervals_and_verdicts(chars, data_dir):
    model = tiny_model("llama")
    dense = evaluate(model, chars, tasks=("lambada", "wikitext2"), limit=6, data_dir=data_dir, seqlen=64)
    same = compare(dense, dense)
    assert list(same.columns)[4:] == ["dense 95% CI", "sparse 95% CI", "difference", "difference 95% CI",
                                      "significant"]
    assert not same["significant"].any() and (same["difference"] == 0).all()
    assert same["metric"].iloc[-1].startswith("WikiText-2 perplexity (64-token windows")
    # a pruned model that got every window 0.1 nats worse: a real, paired drop
    worse_nll = [value + 0.1 for value in dense["wikitext2"]["items"]["nll"]]
    worse = {"wikitext2": {**dense["wikitext2"], **perplexity_summary(worse_nll), "items": {"nll": worse_nll}}}
    table = compare({"wikitext2": dense["wikitext2"]}, worse)
    assert bool(table["significant"].iloc[0]) and table["difference"].iloc[0] > 0
    assert table["difference"].iloc[0] == pytest.approx(dense["wikitext2"]["perplexity"] * (math.exp(0.1) - 1))


def test_model_card_lists_each_task_with_its_interval(chars, data_dir):
    from workbench.model_card import evaluation_section

    model = tiny_model("llama")
    dense = evaluate(model, chars, tasks=("lambada", "wikitext2"), limit=5, data_dir=data_dir, seqlen=64)
    text = "\n".join(evaluation_section({"dense": dense, "sparse": dense}))
    assert "| metric | dense (95% CI) | pruned (95% CI) | relative drop | difference (95% CI) | significant |" in text
    accuracy_row = next(line for line in text.splitlines() if line.startswith("| LAMBADA last-word accuracy"))
    low, high = dense["lambada"]["accuracy_ci"]
    assert f"[{low:.4g}, {high:.4g}]" in accuracy_row and accuracy_row.endswith("| no |")
    assert "WikiText-2 perplexity (64-token windows, no per-window BOS (SparseGPT/Wanda))" in text
    assert "McNemar" in text
    alone = "\n".join(evaluation_section(dense))
    assert "| task | metric | pruned | 95% CI |" in alone and "no per-window BOS" in alone


class _ScaledLogits(torch.nn.Module):
    """A model with a post-head step the evaluator does not know: logits doubled in forward."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        out.logits = out.logits * 2
        return out


def _perplexity_by_hand(model, tokenizer, seqlen=32, windows=2):
    ids = torch.tensor(tokenizer(LONG_TEXT).input_ids[: windows * seqlen]).view(windows, seqlen)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return math.exp(sum(F.cross_entropy(logits[w, :-1], ids[w, 1:]).item() for w in range(windows)) / windows)


def test_head_split_follows_soft_capping_and_falls_back_on_unknown_steps(chars):
    import workbench.evaluate as evaluation

    torch.manual_seed(0)
    gemma = T.AutoModelForCausalLM.from_config(T.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=128, final_logit_softcapping=0.5)).eval()  # a cap small enough to matter
    value = perplexity(gemma, chars, LONG_TEXT, seqlen=32, limit=2)["perplexity"]
    assert value == pytest.approx(_perplexity_by_hand(gemma, chars), rel=1e-5)
    assert evaluation._HEAD_CHECKED[gemma] is True  # the chunked path, with the cap applied
    scaled = _ScaledLogits(tiny_model("llama"))
    value = perplexity(scaled, chars, LONG_TEXT, seqlen=32, limit=2)["perplexity"]
    assert value == pytest.approx(_perplexity_by_hand(scaled, chars), rel=1e-5)
    assert evaluation._HEAD_CHECKED[scaled] is False
    words = lambada_last_word(scaled, chars, PASSAGES)
    assert words["perplexity"] == pytest.approx(
        lambada_last_word(_NoLogitsToKeep(scaled), chars, PASSAGES)["perplexity"], rel=1e-6)
