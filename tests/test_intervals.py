"""Interval formulas against hand-computed values, and paired verdicts on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workbench.intervals import (
    accuracy_summary,
    bootstrap_perplexity_interval,
    format_interval,
    intervals_overlap,
    mcnemar_exact,
    mean_stderr,
    paired_accuracy,
    paired_perplexity,
    paired_task_mean,
    perplexity_summary,
    task_mean_summary,
    wilson_interval,
)


def test_mean_stderr_is_lm_evals_definition():
    # p = 0.75, n = 4: sqrt(p (1 - p) / (n - 1)) = sqrt(0.1875 / 3) = 0.25
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)
    # p = 0.5, n = 4: sqrt(0.25 / 3)
    assert mean_stderr([1, 1, 0, 0]) == pytest.approx(0.2886751346)
    assert math.isnan(mean_stderr([1]))


def test_wilson_interval_by_hand():
    low, high = wilson_interval(8, 10)  # the textbook 8/10 example
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(20, 20)[0] < 1.0  # all correct still leaves doubt


def test_accuracy_summary():
    summary = accuracy_summary([1, 0, 1, 1])
    assert summary["accuracy"] == 0.75 and summary["accuracy_stderr"] == pytest.approx(0.25)
    low, high = summary["accuracy_ci"]
    assert low < 0.75 < high


def test_mcnemar_exact_by_hand():
    reference = [1] * 10 + [1] * 6 + [0] * 1 + [0] * 3
    other = [1] * 10 + [0] * 6 + [1] * 1 + [0] * 3
    # 7 discordant pairs, split 6 / 1: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 16 / 128
    assert mcnemar_exact(reference, other) == pytest.approx(0.125)
    # 8 discordant, all one way: p = 2 / 2^8
    assert mcnemar_exact([1] * 8 + [0] * 4, [0] * 8 + [0] * 4) == pytest.approx(2 / 256)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0


def test_identical_models_are_never_significant():
    rng = np.random.default_rng(1)
    items = rng.integers(0, 2, 500).astype(float)
    verdict = paired_accuracy(items, items)
    assert not verdict.significant and verdict.difference == 0 and verdict.ci == (0.0, 0.0)
    assert verdict.p_value == 1.0
    nll = rng.normal(3.0, 0.3, 50)
    same = paired_perplexity(nll, nll)
    assert not same.significant and same.difference == 0.0 and same.ci == (0.0, 0.0)
    mean = paired_task_mean([(items, items), (items[:100], items[:100])])
    assert not mean.significant and mean.difference == 0.0


def test_a_clear_drop_is_significant_and_a_tiny_one_is_not():
    reference = np.ones(200)
    dropped = reference.copy()
    dropped[:40] = 0  # 40 items lost, none gained
    verdict = paired_accuracy(reference, dropped)
    assert verdict.significant and verdict.difference == pytest.approx(-0.2)
    assert verdict.ci[1] < 0 and verdict.ci[0] <= -0.2 <= verdict.ci[1]
    flipped = reference.copy()
    flipped[:2] = 0  # two items lost out of 200: noise
    assert not paired_accuracy(reference, flipped).significant


def test_paired_perplexity_sees_a_shift_that_unpaired_intervals_miss():
    rng = np.random.default_rng(0)
    reference = rng.normal(3.0, 0.5, 40)  # windows vary a lot ...
    other = reference + 0.02  # ... but every window got slightly worse
    verdict = paired_perplexity(reference, other)
    assert verdict.significant and verdict.ci[0] > 0
    assert verdict.difference == pytest.approx(math.exp(np.mean(other)) - math.exp(np.mean(reference)))
    # the unpaired intervals of the two perplexities overlap: only the pairing resolves the drop
    assert intervals_overlap(bootstrap_perplexity_interval(reference), bootstrap_perplexity_interval(other))


def test_perplexity_bootstrap_is_seeded_and_brackets_the_estimate():
    nll = [2.0, 2.5, 3.0, 3.5, 2.2, 2.8]
    first, second = perplexity_summary(nll), perplexity_summary(nll)
    assert first == second
    assert first["perplexity"] == pytest.approx(math.exp(np.mean(nll)))
    low, high = first["perplexity_ci"]
    assert low < first["perplexity"] < high
    assert bootstrap_perplexity_interval([3.0] * 5) == (pytest.approx(math.exp(3)), pytest.approx(math.exp(3)))


def test_task_mean_by_hand():
    summary = task_mean_summary([[1, 0, 1, 1], [1, 1, 0, 0]])
    assert summary["accuracy"] == pytest.approx(0.625)
    assert summary["accuracy_stderr"] == pytest.approx(math.sqrt(0.25**2 + 0.25 / 3) / 2)


def test_paired_needs_the_same_items():
    with pytest.raises(ValueError, match="same items"):
        paired_accuracy([1, 0, 1], [1, 0])


def test_format_interval():
    assert format_interval([0.41234, 0.5]) == "[0.4123, 0.5]"
    assert format_interval(None) == "" and format_interval([float("nan"), 1.0]) == ""
