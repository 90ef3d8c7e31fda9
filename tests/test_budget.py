"""The budgeted sweep: a small first pass, then items spent only where neighbours are not told apart."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model, token_batch

from workbench.budget import run_budgeted_sweep
from workbench.evaluate import perplexity
from workbench.intervals import paired_perplexity
from workbench.runs import load_run
from workbench.sweep import SweepConfig

TEXT = " ".join(["the cat sat on the mat and looked at the dog", "numbers 1 2 3 4 5 6 7 8 9"] * 16)


def _config() -> SweepConfig:
    return SweepConfig(methods=("magnitude",), sparsities=(0.3, 0.9), extra_patterns=(), nsamples=4, seqlen=16,
                       batch_size=4, tasks=("wikitext2",), limit=16)


def test_budget_is_spent_on_unresolved_neighbours(chars, tmp_path):
    def windows(model, n):
        return {"text": perplexity(model, chars, TEXT, seqlen=24, limit=n)}

    outcome = run_budgeted_sweep(tiny_model("llama"), chars, _config(), budget=40, first=4, run_dir=tmp_path / "run",
                                 evaluate_at=windows, calibration=token_batch(4, 16))
    keys = ["dense", "magnitude|unstructured|0.3000|uniform", "magnitude|unstructured|0.9000|uniform"]
    assert list(outcome.table["key"]) == keys and set(outcome.resolved) == set(keys)
    assert outcome.items_used == sum(outcome.items.values()) <= 40
    assert all(4 <= n <= 16 for n in outcome.items.values())
    for key in keys:  # each point on a prefix of dense's windows
        ids = outcome.scores[key]["text"]["item_ids"]
        assert ids == list(range(outcome.items[key]))
    # a resolved point really differs from each neighbour on their shared items
    line = keys
    for a, b in zip(line, line[1:]):
        n = min(outcome.items[a], outcome.items[b])
        significant = paired_perplexity(outcome.scores[a]["text"]["items"]["nll"][:n],
                                        outcome.scores[b]["text"]["items"]["nll"][:n]).significant
        if outcome.resolved[a] and outcome.resolved[b]:
            assert significant
    run = load_run(tmp_path / "run")
    stored = run.load_json("budget")
    assert stored["items"] == outcome.items and stored["items_used"] == outcome.items_used
    assert len(run.load_json("items-dense")["text"]["item_ids"]) == outcome.items["dense"]


def test_indistinguishable_points_use_the_budget_and_stay_unresolved(chars):
    fixed = {}

    def same_scores(model, n):  # every point scores exactly like dense
        if n not in fixed:
            fixed[n] = {"text": perplexity(tiny_model("llama"), chars, TEXT, seqlen=24, limit=n)}
        return fixed[n]

    outcome = run_budgeted_sweep(tiny_model("llama"), chars, _config(), budget=1000, first=4,
                                 evaluate_at=same_scores, calibration=token_batch(4, 16))
    assert not any(outcome.resolved.values())
    assert set(outcome.items.values()) == {16}  # grown to max_items, then stopped
    assert outcome.items_used == 3 * 16


def test_budget_too_small_is_refused(chars):
    with pytest.raises(ValueError, match="cannot score"):
        run_budgeted_sweep(tiny_model("llama"), chars, _config(), budget=5, first=4,
                           evaluate_at=lambda m, n: {}, calibration=token_batch(4, 16))
