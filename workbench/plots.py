"""Matplotlib figures from result tables: sparsity and error heatmaps, mask crops, sweep curves.

Every function returns a `matplotlib.figure.Figure` built directly (no pyplot state), so they are
safe in threads, headless servers and notebooks alike. Save with `fig.savefig(path)` or
`workbench.runs.Run.save_figure`.
"""

from __future__ import annotations

import io
import math
import threading

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from workbench.sparsity import by_block_and_kind

# Matplotlib's text layout (its mathtext parser) is not thread-safe: a server drawing figures for
# several requests at once fails at random. Every render in the process goes through this lock.
RENDER_LOCK = threading.RLock()


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, rendered under RENDER_LOCK."""
    buffer = io.BytesIO()
    with RENDER_LOCK:
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


# Metric columns in sweep tables are "task/metric" (see workbench.sweep.flatten_metrics).
ACCURACY_SUFFIX = "/accuracy"
PERPLEXITY_SUFFIX = "/perplexity"


def _annotated_heatmap(matrix: pd.DataFrame, title: str | None, cbar_label: str, fmt: str,
                       vmin: float | None, vmax: float | None, cmap: str) -> Figure:
    values = matrix.to_numpy(dtype=float)
    rows, cols = values.shape
    fig = Figure(figsize=(1.0 + 0.85 * max(cols, 2), 1.2 + 0.3 * max(rows, 3)))
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest")
    ax.set_xticks(range(cols), [str(c) for c in matrix.columns], rotation=30, ha="right")
    ax.set_yticks(range(rows), [str(r) for r in matrix.index])
    ax.set_ylabel(str(matrix.index.name or "block"))
    lo = np.nanmin(values) if vmin is None and np.isfinite(values).any() else (vmin or 0.0)
    hi = np.nanmax(values) if vmax is None and np.isfinite(values).any() else (vmax or 1.0)
    middle = (lo + hi) / 2
    fontsize = 8 if rows <= 32 else 6
    for i in range(rows):
        for j in range(cols):
            value = values[i, j]
            if not np.isfinite(value):
                continue
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=fontsize,
                    color="white" if value < middle else "black")
    fig.colorbar(image, ax=ax, label=cbar_label)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def sparsity_heatmap(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Blocks x module kinds coloured by the counted sparsity of `sparsity_table(...)`.

    Removed channels/heads count when the table was built with `reference_shapes`.
    """
    if table.empty:
        raise ValueError("the sparsity table is empty: nothing to draw")
    matrix = by_block_and_kind(table)
    return _annotated_heatmap(matrix, title or "Sparsity per block and module", "sparsity",
                              ".2f", 0.0, 1.0, "viridis")


def error_heatmap(errors: pd.DataFrame, title: str | None = None) -> Figure:
    """`PruneResult.errors`: relative output error ||(W-W')X||^2/||WX||^2 per block and kind."""
    if errors.empty or errors["error"].isna().all():
        raise ValueError("no layer errors to draw: prune with record_error=True")
    kinds = list(dict.fromkeys(errors["kind"]))
    matrix = errors.pivot_table(index="block", columns="kind", values="error", aggfunc="mean",
                                sort=False)[kinds].sort_index()
    return _annotated_heatmap(matrix, title or "Relative output error per block and module",
                              "relative output error", ".3f", 0.0, None, "magma")


def mask_zoom(mask: torch.Tensor, rows: int = 64, cols: int = 64, row0: int = 0, col0: int = 0,
              title: str | None = None) -> Figure:
    """A crop of one layer's keep mask: kept weights light, pruned weights dark. Rows are output
    features, columns input features, so 2:4 groups run along a row and channels are stripes."""
    if mask.dim() != 2:
        raise ValueError(f"a keep mask is 2-D (out, in); got shape {tuple(mask.shape)}")
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be positive, got {rows} x {cols}")
    out_f, in_f = mask.shape
    if not (0 <= row0 < out_f and 0 <= col0 < in_f):
        raise ValueError(f"crop origin ({row0}, {col0}) lies outside the {out_f} x {in_f} mask")
    crop = mask[row0:row0 + rows, col0:col0 + cols].detach().to("cpu", torch.float32).numpy()
    fig = Figure(figsize=(5, 5 * crop.shape[0] / max(crop.shape[1], 1) + 0.6))
    ax = fig.add_subplot()
    ax.imshow(crop, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal",
              extent=(col0 - 0.5, col0 + crop.shape[1] - 0.5, row0 + crop.shape[0] - 0.5, row0 - 0.5))
    ax.set_xlabel("input feature")
    ax.set_ylabel("output feature")
    kept = crop.mean() if crop.size else 0.0
    ax.set_title(title or f"keep mask [{row0}:{row0 + crop.shape[0]}, {col0}:{col0 + crop.shape[1]}]"
                 f" - {1 - kept:.0%} pruned")
    fig.tight_layout()
    return fig


def _metric_columns(results: pd.DataFrame) -> tuple[list[str], list[str]]:
    accuracy = [c for c in results.columns if str(c).endswith(ACCURACY_SUFFIX)]
    perplexity = [c for c in results.columns if str(c).endswith(PERPLEXITY_SUFFIX)]
    return accuracy, perplexity


def _line_label(method: str, pattern: str, allocation: str) -> str:
    label = method if pattern == "unstructured" else f"{method} {pattern}"
    return label if allocation in ("", "uniform") else f"{label} ({allocation})"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def accuracy_curve(results: pd.DataFrame, dense: dict | None = None,
                   x: str = "sparsity_blocks", title: str | None = None, bands: bool = True) -> Figure:
    """Metric vs measured sparsity: one line per method/pattern/allocation, dense as a dashed
    horizontal reference. One panel per accuracy metric, then one per perplexity (log scale).

    Where the table has 95% intervals ("task/metric_lo" / "_hi", see `evaluate`), each line gets
    a shaded band and dense a grey one (`bands=False` leaves them out); points whose paired
    difference from dense is not significant ("_significant" False) get hollow markers.

    `results` is `run_sweep`'s table; its `method == "dense"` row is the reference unless `dense`
    ({"task/metric": value}) is given. Each point is labelled with its measured sparsity.
    """
    accuracy, perplexity = _metric_columns(results)
    metrics = accuracy + perplexity
    if not metrics:
        raise ValueError("no metric columns ('task/accuracy' or 'task/perplexity') to draw")
    if dense is None:
        dense_rows = results[results["method"] == "dense"]
        dense = dense_rows.iloc[0].to_dict() if len(dense_rows) else {}
    points = results[results["method"] != "dense"].copy()
    for column in ("pattern", "allocation"):
        if column not in points:
            points[column] = "unstructured" if column == "pattern" else "uniform"
    fig = Figure(figsize=(5.2 * len(metrics), 4.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        banded = False
        groups = points.groupby(["method", "pattern", "allocation"], sort=False)
        for (method, pattern, allocation), group in groups:
            group = group.dropna(subset=[metric]).sort_values(x)
            line, = ax.plot(group[x], group[metric], marker="o" if pattern == "unstructured" else "s",
                            label=_line_label(method, pattern, allocation))
            line.set_gid("point-line")
            if bands and {f"{metric}_lo", f"{metric}_hi"} <= set(group.columns):
                shown = group.dropna(subset=[f"{metric}_lo", f"{metric}_hi"])
                if len(shown):
                    band = ax.fill_between(shown[x], shown[f"{metric}_lo"], shown[f"{metric}_hi"],
                                           color=line.get_color(), alpha=0.18, linewidth=0)
                    band.set_gid("interval-band")
                    banded = True
            if f"{metric}_significant" in group.columns:  # hollow markers: not told apart from dense
                unresolved = group[group[f"{metric}_significant"].astype(str) == "False"]
                ax.plot(unresolved[x], unresolved[metric], linestyle="none", marker="o", markersize=9,
                        markerfacecolor="white", markeredgecolor=line.get_color(), zorder=3, gid="not-significant")
            for xv, yv in zip(group[x], group[metric]):
                ax.annotate(f"{xv:.0%}", (xv, yv), textcoords="offset points", xytext=(3, 4),
                            fontsize=7, color=line.get_color())
        reference = dense.get(metric)
        if reference is not None and not (isinstance(reference, float) and math.isnan(reference)):
            ref = ax.axhline(reference, color="black", linestyle="--", linewidth=1, label="dense")
            ref.set_gid("dense")
            low, high = dense.get(f"{metric}_lo"), dense.get(f"{metric}_hi")
            if bands and _finite(low) and _finite(high):
                ax.axhspan(low, high, color="black", alpha=0.08, linewidth=0).set_gid("dense-band")
                banded = True
        if metric in perplexity:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda value, _pos: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            low, high = ax.get_ylim()
            # minor labels only help inside one decade; across several they pile up
            ax.yaxis.set_minor_formatter(plain if high / max(low, 1e-12) < 10 else NullFormatter())
        ax.set_xlabel("measured sparsity" + (" (decoder blocks)" if x == "sparsity_blocks" else ""))
        ax.set_ylabel(metric)
        ax.set_title(metric + ("\nshaded: 95% interval; hollow: not significantly different from dense"
                               if banded else ""), fontsize=10 if banded else None)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def sensitivity_heatmap(frame: pd.DataFrame, columns: list[str] | None = None,
                        title: str | None = None) -> Figure:
    """Per-block allocation view: one row per quantity (outlier ratio, loss increase, allocated
    sparsity ...), one column per block. Colours are scaled per row, so rows of different units
    share the figure; the annotations show the raw values."""
    if "block" in frame.columns:
        frame = frame.set_index("block")
    columns = columns or [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    if not columns:
        raise ValueError("no numeric columns to draw")
    raw = frame[columns].T.astype(float)
    lo = raw.min(axis=1).to_numpy()[:, None]
    span = (raw.max(axis=1).to_numpy()[:, None] - lo)
    scaled = (raw.to_numpy() - lo) / np.where(span > 0, span, 1.0)
    blocks = raw.shape[1]
    fig = Figure(figsize=(1.5 + 0.42 * blocks, 0.9 + 0.6 * len(columns)))
    ax = fig.add_subplot()
    ax.imshow(scaled, aspect="auto", cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(blocks), [str(b) for b in raw.columns])
    ax.set_yticks(range(len(columns)), columns)
    ax.set_xlabel("block")
    for i in range(len(columns)):
        for j in range(blocks):
            value = raw.iat[i, j]
            if np.isfinite(value):
                text = f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5, rotation=90)
    ax.set_title(title or "Per-block sensitivity and allocation (colour scaled per row)")
    fig.tight_layout()
    return fig
