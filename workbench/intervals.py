"""Error bars: standard errors, 95% intervals and paired dense-vs-pruned verdicts (pure functions).

- An accuracy's standard error is lm-eval's: the sample standard deviation of the 0/1 items over
  sqrt(n), i.e. sqrt(p(1-p)/(n-1)). Its 95% interval is Wilson's score interval, which stays
  inside [0, 1] and is honest at small n or p near 0 or 1.
- A perplexity exp(mean NLL) gets a percentile bootstrap interval over its items (windows or
  passages), resampled with a fixed seed.
- Two models scored on the same items are compared item by item: the paired difference, a paired
  bootstrap interval for it, and for accuracies the exact McNemar test on the discordant items.
  A drop is `significant` when McNemar's p < alpha (accuracy) or the paired interval excludes 0
  (perplexity); identical item scores are never significant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
BOOTSTRAP_ITERS = 1000
SEED = 0


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's `mean_stderr`: sample standard deviation (n-1) over sqrt(n); nan below two items."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return float("nan")
    return float(x.std(ddof=1) / math.sqrt(x.size))


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion successes/n."""
    if n < 1:
        return (float("nan"), float("nan"))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def _resample_indices(n: int, iters: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(iters, n))


def perplexity_of(nll: Sequence[float]) -> float:
    return float(math.exp(float(np.mean(np.asarray(nll, dtype=float)))))


def bootstrap_perplexity_interval(nll: Sequence[float], iters: int = BOOTSTRAP_ITERS,
                                  seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of exp(mean NLL), resampling the items."""
    x = np.asarray(nll, dtype=float)
    if x.size < 2:
        return (float("nan"), float("nan"))
    means = x[_resample_indices(x.size, iters, seed)].mean(axis=1)
    low, high = np.percentile(np.exp(means), [2.5, 97.5])
    return (float(low), float(high))


def accuracy_summary(correct: Sequence[float]) -> dict:
    """{"accuracy", "accuracy_stderr", "accuracy_ci"} of 0/1 items."""
    x = np.asarray(correct, dtype=float)
    low, high = wilson_interval(float(x.sum()), int(x.size))
    return {"accuracy": float(x.mean()) if x.size else float("nan"),
            "accuracy_stderr": mean_stderr(x), "accuracy_ci": [low, high]}


def perplexity_summary(nll: Sequence[float], seed: int = SEED) -> dict:
    """{"perplexity", "perplexity_ci"} of per-item NLLs (perplexity = exp(mean NLL))."""
    low, high = bootstrap_perplexity_interval(nll, seed=seed)
    return {"perplexity": perplexity_of(nll), "perplexity_ci": [low, high]}


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes (binomial test on discordant pairs)."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(discordant, i) for i in range(k + 1)) / 2 ** discordant
    return float(min(1.0, 2 * tail))


@dataclass
class Paired:
    """Paired comparison of one metric: `difference` = other - reference (same items)."""

    metric: str
    reference: float
    other: float
    difference: float
    ci: tuple[float, float]
    p_value: float | None  # exact McNemar for accuracies; None for perplexity
    significant: bool
    n: int

    def as_dict(self) -> dict:
        return {"metric": self.metric, "reference": self.reference, "other": self.other,
                "difference": self.difference, "ci": list(self.ci), "p_value": self.p_value,
                "significant": self.significant, "n": self.n}


def _check_paired(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same items: {a.size} vs {b.size} scores")
    if a.size == 0:
        raise ValueError("no items to compare")


def paired_accuracy(reference: Sequence[float], other: Sequence[float], alpha: float = 0.05,
                    iters: int = BOOTSTRAP_ITERS, seed: int = SEED) -> Paired:
    """Accuracy difference on the same items: paired bootstrap interval, exact McNemar verdict."""
    a, b = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    _check_paired(a, b)
    diff = b - a
    if not diff.any():
        ci = (0.0, 0.0)
    else:
        means = diff[_resample_indices(diff.size, iters, seed)].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        ci = (float(low), float(high))
    p = mcnemar_exact(a, b)
    return Paired("accuracy", float(a.mean()), float(b.mean()), float(diff.mean()), ci, p,
                  bool(p < alpha), int(a.size))


def paired_perplexity(reference_nll: Sequence[float], other_nll: Sequence[float],
                      iters: int = BOOTSTRAP_ITERS, seed: int = SEED) -> Paired:
    """Perplexity difference on the same items: paired bootstrap over items; significant when the
    95% interval of the difference excludes 0."""
    a, b = np.asarray(reference_nll, dtype=float), np.asarray(other_nll, dtype=float)
    _check_paired(a, b)
    ppl_a, ppl_b = perplexity_of(a), perplexity_of(b)
    if np.array_equal(a, b) or a.size < 2:
        ci = (0.0, 0.0) if np.array_equal(a, b) else (float("nan"), float("nan"))
        return Paired("perplexity", ppl_a, ppl_b, ppl_b - ppl_a, ci, None, False, int(a.size))
    index = _resample_indices(a.size, iters, seed)
    diffs = np.exp(b[index].mean(axis=1)) - np.exp(a[index].mean(axis=1))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return Paired("perplexity", ppl_a, ppl_b, ppl_b - ppl_a, (float(low), float(high)), None,
                  bool(low > 0 or high < 0), int(a.size))


def task_mean_summary(per_task: Sequence[Sequence[float]]) -> dict:
    """The unweighted mean of several tasks' accuracies; its standard error treats the tasks as
    independent (sqrt(sum se_i^2) / k), its interval is the normal one."""
    if not per_task:
        raise ValueError("no tasks to average")
    means = [float(np.mean(items)) for items in per_task]
    k = len(per_task)
    stderr = math.sqrt(sum(mean_stderr(items) ** 2 for items in per_task)) / k
    mean = sum(means) / k
    return {"accuracy": mean, "accuracy_stderr": stderr, "accuracy_ci": [mean - Z95 * stderr, mean + Z95 * stderr]}


def paired_task_mean(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], iters: int = BOOTSTRAP_ITERS,
                     seed: int = SEED) -> Paired:
    """Difference of the mean accuracy over several tasks, each task's items paired: every
    bootstrap draw resamples each task's items and averages the per-task differences."""
    if not pairs:
        raise ValueError("no tasks to average")
    diffs, draws = [], np.zeros(iters)
    for offset, (reference, other) in enumerate(pairs):
        a, b = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
        _check_paired(a, b)
        diff = b - a
        diffs.append(diff)
        draws += diff[_resample_indices(diff.size, iters, seed + offset)].mean(axis=1)
    draws /= len(pairs)
    reference = float(np.mean([np.mean(a) for a, _ in pairs]))
    other = float(np.mean([np.mean(b) for _, b in pairs]))
    if not any(d.any() for d in diffs):
        return Paired("accuracy", reference, other, 0.0, (0.0, 0.0), None, False, sum(d.size for d in diffs))
    low, high = np.percentile(draws, [2.5, 97.5])
    return Paired("accuracy", reference, other, other - reference, (float(low), float(high)), None,
                  bool(low > 0 or high < 0), sum(d.size for d in diffs))


def intervals_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two [low, high] intervals share a point."""
    return not (a[1] < b[0] or b[1] < a[0])


def format_interval(ci: Sequence[float] | None, digits: int = 4) -> str:
    """"[0.4120, 0.4710]"; empty for a missing interval."""
    if ci is None or len(ci) != 2 or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return ""
    return f"[{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]"
