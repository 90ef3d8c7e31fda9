"""What each sweep point was scored on, and its paired comparison with the dense model.

Every point of a sweep is evaluated on the dense model's items (same passages, windows and
documents), so a point's difference from dense is paired item by item and its interval is tight.
The per-item scores of each point are stored in the run folder as `items-<point>.json`; a point
scored on other items than dense is an error, never a silent unpaired comparison.
"""

from __future__ import annotations

from collections.abc import Callable

from workbench.evaluate import item_scores, paired_columns
from workbench.runs import Run


def keeping_items(evaluate_fn: Callable, scored: dict) -> Callable:
    """`evaluate_fn` that also leaves its result's per-item scores in `scored` (replaced each call)."""

    def run(model):
        results = evaluate_fn(model)
        scored.clear()
        scored.update(item_scores(results) if isinstance(results, dict) else {})
        return results

    return run


def _slug(key: str) -> str:
    return key.replace("|", "-").replace(":", "_")


def stored_items(run: Run | None, key: str) -> dict | None:
    """A point's stored per-item scores, or None."""
    if run is None or not (run.path / f"items-{_slug(key)}.json").is_file():
        return None
    return run.load_json(f"items-{_slug(key)}")


def paired_row(run: Run | None, key: str, row: dict, scored: dict, dense_items: dict | None) -> dict:
    """Store what the point was scored on; add its paired columns against dense
    ("task/metric_diff", "_diff_lo", "_diff_hi", "_significant")."""
    if not scored:
        return row
    if run is not None:
        run.save_json(f"items-{_slug(key)}", scored)
    if not dense_items or key == "dense":
        return row
    return {**row, **paired_columns(dense_items, scored)}
