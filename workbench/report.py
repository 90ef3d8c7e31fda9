"""Result tables as a person reads them: the metric, dense, pruned and the change in words first,
numbers rounded for the screen (the frames keep full precision for downloads), and the
comparison of stored runs cut down to the chosen metrics.

Plain pandas: both user interfaces and the notebook show these frames.
"""

from __future__ import annotations

import math
import re

import pandas as pd

LEAD_COLUMNS = ["Metric", "Dense", "Pruned", "Change"]
# the seed table's context, after the figures; the same names as workflow.SUMMARY_COLUMNS
CONTEXT_COLUMNS = ["Evaluation dataset", "Sparsity pattern", "Over MLP block sparsity", "Element-wise/matmul ratio",
                   "Method", "Calibration dataset", "Model"]
RESULTS_COLUMNS = LEAD_COLUMNS + CONTEXT_COLUMNS
METRIC_KINDS = ("accuracy", "perplexity")
# "lambada/accuracy" in a sweep point, "dense/lambada/accuracy" or "sparse/..." in a prune's results
_METRIC_COLUMN = re.compile(r"^(?:(dense|sparse)/)?(.+)/(accuracy|perplexity)$")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_perplexity(metric: str) -> bool:
    return "perplexity" in str(metric).lower()


def format_value(metric: str, value) -> str:
    """An accuracy as a percentage, a perplexity with two decimals (3 significant digits when huge)."""
    if not _finite(value):
        return "-"
    if is_perplexity(metric):
        return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"
    return f"{value:.2%}"


def change_words(metric: str, dense, pruned, significant=None) -> str:
    """"accuracy -12.5 points" (pruned minus dense, in percentage points) or "perplexity x2.9"
    (pruned over dense); "within noise" when the paired test could not tell the two apart."""
    if not (_finite(dense) and _finite(pruned)):
        return "-"
    if is_perplexity(metric):
        ratio = pruned / dense if dense else math.inf
        words = f"perplexity x{ratio:,.0f}" if ratio >= 1000 else f"perplexity x{ratio:.3g}"
    else:
        words = f"accuracy {(pruned - dense) * 100:+.1f} points"
    return words + (" (within noise)" if significant is False else "")


def results_view(comparison: pd.DataFrame | None, table: pd.DataFrame) -> pd.DataFrame:
    """One row per metric: the lead columns from `comparison` (`evaluate.compare`, full precision),
    the context from the seed `table` (`workflow.summary_table`, the same rows in the same order)."""
    rows = []
    context = table.reindex(columns=CONTEXT_COLUMNS).to_dict("records") if len(table) else [{}]
    compared = comparison.to_dict("records") if comparison is not None and len(comparison) else []
    for index, where in enumerate(context):
        if index < len(compared):
            row = compared[index]
            metric, dense, pruned = row["metric"], row["dense"], row["sparse"]
            significant = row.get("significant")
            change = change_words(metric, dense, pruned, significant if isinstance(significant, bool) else None)
        else:
            metric, dense, pruned, change = "-", math.nan, math.nan, "-"
        rows.append({"Metric": metric, "Dense": dense, "Pruned": pruned, "Change": change, **where})
    return pd.DataFrame(rows, columns=RESULTS_COLUMNS)


def styled(frame: pd.DataFrame):
    """`frame` (from results_view or compare_view) with its figures rounded for display only."""
    styler = frame.style.hide(axis="index")
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    for column in numeric:
        if column == "sparsity":
            styler = styler.format("{:.1%}", subset=[column], na_rep="-")
        elif "Metric" not in frame.columns:  # compare_view: the column names the metric
            styler = styler.format(lambda value, metric=column: format_value(metric, value), subset=[column])
        else:  # results_view: each row names its metric
            for row in frame.index:
                metric = str(frame.at[row, "Metric"])
                styler = styler.format(lambda value, metric=metric: format_value(metric, value),
                                       subset=pd.IndexSlice[[row], [column]])
    return styler


def most_pruned_layer(result) -> str | None:
    """The layer with the highest sparsity counted from the weights (the first such one); None
    when nothing was pruned. `result` is a `prune.PruneResult`."""
    if not result.masks:
        return None
    table = getattr(result, "sparsity", None)
    if table is None or table.empty or "name" not in table or "sparsity" not in table:
        return next(iter(result.masks))
    counted = table[table["name"].isin(list(result.masks))]
    if counted.empty:
        return next(iter(result.masks))
    return str(counted.loc[counted["sparsity"].astype(float).idxmax(), "name"])


def layer_weight(model, name: str):
    """The (out, in) weight of the linear `name` in `model` (a torch module), or None when there
    is no model or no such linear in it (so a view falls back to the method's mask)."""
    from workbench.arch import is_linear, weight_of

    if model is None:
        return None
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return weight_of(module) if is_linear(module) else None


def _metric_label(task: str, metric: str) -> str:
    from workbench.evaluate import metric_label

    return metric_label(task, metric)


def _point_name(row: dict, side: str) -> str:
    if side == "dense" or row.get("method") == "dense":
        return "dense"
    if side == "sparse":
        return "pruned"
    method, pattern, allocation = row.get("method"), row.get("pattern"), row.get("allocation")
    name = " ".join(str(v) for v in (method, pattern) if isinstance(v, str) and v)
    if isinstance(allocation, str) and allocation not in ("", "uniform"):
        name += f" ({allocation})"
    return name or "point"


def compare_view(table: pd.DataFrame, kinds: tuple[str, ...] | list[str] = METRIC_KINDS) -> pd.DataFrame:
    """`runs.compare_runs`'s wide table cut to one row per run and point (dense, pruned, each
    sweep point) with its measured sparsity and the chosen metric kinds, named in words."""
    rows = []
    for row in table.to_dict("records"):
        sides: dict[str, dict[str, float]] = {}
        for column, value in row.items():
            match = _METRIC_COLUMN.match(str(column))
            if match and match.group(3) in kinds and _finite(value):
                sides.setdefault(match.group(1) or "", {})[_metric_label(match.group(2), match.group(3))] = value
        for side, metrics in sides.items():
            name = _point_name(row, side)
            sparsity = 0.0 if name == "dense" else next(
                (row[c] for c in ("sparsity_blocks", "sparsity/matmul", "sparsity_matmul") if _finite(row.get(c))),
                math.nan)
            rows.append({"run": row.get("run"), "point": name, "sparsity": sparsity, **metrics})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["run", "point", "sparsity"])
    return frame.drop_duplicates(subset=["run", "point", "sparsity"], ignore_index=True)
