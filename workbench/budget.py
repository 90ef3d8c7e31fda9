"""A budgeted sweep: score every point on a few items, then spend the rest where it decides something.

    outcome = run_budgeted_sweep(model, tokenizer, config, budget=2000, first=50)
    outcome.table      # one row per point: metrics, items scored, resolved
    outcome.resolved   # {point key: bool}

Every point (dense included) is first scored on the first `first` items of each task. Along each
method's line (dense, then increasing sparsity), two neighbouring points are *resolved* when the
paired 95% interval of their difference on the items both were scored on excludes zero. While
the item budget lasts, the points of unresolved neighbour pairs are scored on twice as many items
(up to `max_items`); a point is re-pruned (deterministically: same calibration, same config) to
score it again. Every point is scored on a prefix of the same items as dense, so every
comparison stays paired. The run store records what each point was scored on.

`budget` counts items per point per task: a full sweep at `max_items` costs points x max_items.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from torch import nn

from workbench.evaluate import evaluate, item_scores
from workbench.intervals import paired_accuracy, paired_perplexity
from workbench.prune import prune
from workbench.runs import open_run
from workbench.sparsity import sparsity_summary
from workbench.sweep import SweepConfig, flatten_metrics, point_key, prepare_cache, restore_weights, snapshot_weights

log = logging.getLogger(__name__)


@dataclass
class BudgetedOutcome:
    table: pd.DataFrame
    resolved: dict[str, bool]
    items: dict[str, int]  # items per task each point was scored on
    items_used: int
    metric: str  # the "task/metric" that decides resolution
    rounds: int = 0
    scores: dict[str, dict] = field(default_factory=dict, repr=False)  # per point: item_scores(...)


def _primary_metric(scores: dict) -> tuple[str, str]:
    for task, kept in scores.items():
        if "accuracy" in kept.get("items", {}):
            return task, "accuracy"
    for task, kept in scores.items():
        if "nll" in kept.get("items", {}):
            return task, "nll"
    raise ValueError("no per-item accuracy or perplexity to decide on: the evaluator must keep items")


def _neighbours_resolved(a: dict, b: dict, task: str, kind: str) -> bool:
    left, right = a[task]["items"][kind], b[task]["items"][kind]
    n = min(len(left), len(right))
    if n < 2:
        return False
    pair = paired_accuracy(left[:n], right[:n]) if kind == "accuracy" else paired_perplexity(left[:n], right[:n])
    return pair.significant


def _lines(points: list[dict]) -> list[list[str]]:
    """Each (method, pattern) line as point keys: dense first, then by target sparsity."""
    lines: dict[tuple[str, str], list[dict]] = {}
    for point in points:
        lines.setdefault((point["method"], point["pattern"]), []).append(point)
    return [["dense", *[point_key(p) for p in sorted(group, key=lambda p: p["target"])]] for group in lines.values()]


def run_budgeted_sweep(model: nn.Module, tokenizer, config: SweepConfig, budget: int, first: int = 50,
                       max_items: int | None = None, run_dir: str | Path | None = None,
                       evaluate_at: Callable[[nn.Module, int], dict] | None = None,
                       calibration=None, data_dir=None) -> BudgetedOutcome:
    """See the module docstring. `evaluate_at(model, n)` scores the first n items of each task
    (default: `evaluate` on `config.tasks` with limit=n). `max_items` defaults to config.limit."""
    config.validate()
    if config.allocation != "uniform":
        raise ValueError("a budgeted sweep prunes with uniform allocation; drop allocation='owl'")
    max_items = max_items or config.limit
    if not max_items or first < 2 or first > max_items:
        raise ValueError(f"need 2 <= first ({first}) <= max_items ({max_items})")
    points = config.points()
    if budget < first * (len(points) + 1):
        raise ValueError(f"a budget of {budget} items cannot score {len(points) + 1} points on {first} items each")
    if evaluate_at is None:
        def evaluate_at(m, n):
            return evaluate(m, tokenizer, tasks=config.tasks, limit=n, seqlen=config.eval_seqlen, data_dir=data_dir)
    run = open_run(run_dir, "budgeted-sweep", {**config.to_dict(), "budget": budget, "first": first,
                                               "max_items": max_items}) if run_dir is not None else None
    snapshot = snapshot_weights(model)
    prepared = None
    by_key = {point_key(p): p for p in points}
    rows: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    items: dict[str, int] = {}
    used = 0

    def score(key: str, n: int) -> None:
        nonlocal prepared, used
        restore_weights(model, snapshot)
        row: dict = {"method": "dense", "pattern": "", "target": 0.0, "prune_s": 0.0}
        if key != "dense":
            if prepared is None:
                prepared = prepare_cache(model, tokenizer, config, calibration, run)
            point = by_key[key]
            started = time.perf_counter()
            result = prune(model, config.prune_config(point["method"], point["pattern"], point["target"]),
                           calibration=prepared.calibration, tokenizer=tokenizer, cache=prepared.prune_cache)
            row = {**point, "prune_s": time.perf_counter() - started}
            row.update({f"sparsity_{k}": float(result.summary[k]) for k in ("blocks", "matmul")})
        else:
            summary = sparsity_summary(model)
            row.update({f"sparsity_{k}": float(summary[k]) for k in ("blocks", "matmul")})
        results = evaluate_at(model, n)
        used += n - items.get(key, 0)
        items[key], scores[key] = n, item_scores(results)
        rows[key] = {**row, **flatten_metrics(results), "items": n, "key": key}
        if run is not None:
            run.save_json(f"items-{key.replace('|', '-').replace(':', '_')}", scores[key])

    try:
        for key in ["dense", *by_key]:
            score(key, first)
        task, kind = _primary_metric(scores["dense"])
        lines = _lines(points)
        rounds = 0
        while True:
            pairs = [(a, b) for line in lines for a, b in zip(line, line[1:])]
            open_pairs = [(a, b) for a, b in pairs if not _neighbours_resolved(scores[a], scores[b], task, kind)]
            wanted = list(dict.fromkeys(k for pair in open_pairs for k in pair if items[k] < max_items))
            if not wanted:
                break
            grown = False
            for key in wanted:
                n = min(2 * items[key], max_items)
                if used + n - items[key] > budget:
                    continue
                score(key, n)
                grown = True
            if not grown:
                break
            rounds += 1
    finally:
        restore_weights(model, snapshot)

    pairs_by_key: dict[str, list[bool]] = {k: [] for k in items}
    for line in _lines(points):
        for a, b in zip(line, line[1:]):
            verdict = _neighbours_resolved(scores[a], scores[b], task, kind)
            pairs_by_key[a].append(verdict)
            pairs_by_key[b].append(verdict)
    resolved = {k: bool(v) and all(v) for k, v in pairs_by_key.items()}
    table = pd.DataFrame([{**rows[k], "resolved": resolved[k]} for k in ["dense", *by_key]])
    metric = f"{task}/{'perplexity' if kind == 'nll' else kind}"
    if run is not None:
        run.save_table("results", table)
        run.save_json("budget", {"budget": budget, "items_used": used, "items": items, "resolved": resolved,
                                 "metric": metric, "rounds": rounds})
        run.mark_done({"items_used": used, "resolved": resolved})
    log.info("budgeted sweep: %d items of %d, %d rounds, resolved %s", used, budget, rounds, resolved)
    return BudgetedOutcome(table, resolved, items, used, metric, rounds, scores)
