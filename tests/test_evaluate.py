"""Evaluation: batch-size invariance, an independent LAMBADA check, and the bundled model's figures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from workbench.evaluate import (
    compare,
    encode_pair,
    evaluate,
    lambada_last_word,
    last_token_accuracy,
    perplexity,
    split_last_word,
)

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
