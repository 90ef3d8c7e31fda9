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
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

from workbench.evaluate import metric_label
from workbench.sparsity import by_block_and_kind, layer_sparsity

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


KEPT_COLOUR, PRUNED_COLOUR = "#f2f2f2", "#222222"


def _counted_pattern(mask: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """What the mask zoom draws (nonzero = kept) and the layer's pruned share: from the weight's
    zeros when it is given and in memory, from the method's mask otherwise."""
    if weight is None or weight.device.type == "meta":
        return mask, layer_sparsity(mask)
    if weight.dim() != 2 or weight.shape[0] > mask.shape[0] or weight.shape[1] > mask.shape[1]:
        raise ValueError(f"the weight's shape {tuple(weight.shape)} does not fit the layer's "
                         f"{tuple(mask.shape)} keep mask: pass that layer's (out, in) weight")
    if weight.shape == mask.shape:
        return weight, layer_sparsity(weight)
    # slimmed: the removed units are cut out of the weight, so only the mask knows where they were
    return mask, layer_sparsity(weight, tuple(mask.shape))


def mask_zoom(mask: torch.Tensor, rows: int = 64, cols: int = 64, row0: int = 0, col0: int = 0,
              title: str | None = None, layer: str | None = None, weight: torch.Tensor | None = None) -> Figure:
    """A crop of one layer's keep pattern: kept weights light, pruned weights dark, with a legend.
    Rows are output features, columns input features, so 2:4 groups run along a row and channels
    are stripes. `layer` names the layer in the title; the pruned share is the whole layer's.
    `weight`: the layer's current (out, in) weight; given, the picture and the share are its zeros,
    counted as the sparsity heatmap counts them (a weight that was zero before pruning shows as
    pruned). A slimmed weight counts its removed rows or columns as pruned and draws `mask`."""
    if mask.dim() != 2:
        raise ValueError(f"a keep mask is 2-D (out, in); got shape {tuple(mask.shape)}")
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be positive, got {rows} x {cols}")
    out_f, in_f = mask.shape
    if not (0 <= row0 < out_f and 0 <= col0 < in_f):
        raise ValueError(f"crop origin ({row0}, {col0}) lies outside the {out_f} x {in_f} mask")
    pattern, pruned = _counted_pattern(mask, weight)
    crop = (pattern[row0:row0 + rows, col0:col0 + cols].detach() != 0).to("cpu", torch.float32).numpy()
    fig = Figure(figsize=(5, 5 * crop.shape[0] / max(crop.shape[1], 1) + 1.1))
    ax = fig.add_subplot()
    ax.imshow(crop, cmap=ListedColormap([PRUNED_COLOUR, KEPT_COLOUR]), vmin=0, vmax=1, interpolation="nearest",
              aspect="equal", extent=(col0 - 0.5, col0 + crop.shape[1] - 0.5, row0 + crop.shape[0] - 0.5, row0 - 0.5))
    ax.set_xlabel("input feature")
    ax.set_ylabel("output feature")
    where = f"rows {row0}-{row0 + crop.shape[0] - 1}, columns {col0}-{col0 + crop.shape[1] - 1} of {out_f} x {in_f}"
    ax.set_title(title or f"{layer or 'keep mask'}\n{where}; {pruned:.1%} of the layer pruned", fontsize=9)
    legend = ax.legend(handles=[Patch(facecolor=KEPT_COLOUR, edgecolor="black", label="kept"),
                                Patch(facecolor=PRUNED_COLOUR, edgecolor="black", label="pruned")],
                       loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False, fontsize=9)
    legend.set_gid("mask-legend")
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


def _metric_label(column: str) -> str:
    """"lambada/accuracy" -> "LAMBADA last-word accuracy" (the evaluation's own words)."""
    task, _, metric = str(column).rpartition("/")
    return metric_label(task, metric)


def _fixed_y_range(results: pd.DataFrame, metric: str, dense: dict, log: bool) -> tuple[float, float]:
    """An axis that holds still while a sweep's points arrive: anchored on the dense figure (known
    first) and widened only by a point (or interval) beyond it. Accuracy runs from 0 up; perplexity
    from below dense to at least ten times dense."""
    values = [v for c in (metric, f"{metric}_lo", f"{metric}_hi") if c in results
              for v in pd.to_numeric(results[c], errors="coerce").tolist() if _finite(v)]
    values += [v for v in (dense.get(metric), dense.get(f"{metric}_lo"), dense.get(f"{metric}_hi")) if _finite(v)]
    if not values:
        return (0.0, 1.0) if not log else (1.0, 10.0)
    reference = dense.get(metric) if _finite(dense.get(metric)) else values[0]
    if log:  # whole decades above dense, so the top moves only when a point crosses one
        decades = max(1, math.ceil(math.log10(max(max(values), reference) / max(reference, 1e-12)) - 1e-9))
        return max(min(values + [reference]) / 1.25, 1e-3), reference * 10 ** decades * 1.3
    top = math.ceil(max(values) * 1.1 * 10) / 10  # in steps of 0.1
    return 0.0, min(top, 1.0) if max(values) <= 1.0 else top


def accuracy_curve(results: pd.DataFrame, dense: dict | None = None,
                   x: str = "sparsity_blocks", title: str | None = None, bands: bool = True,
                   x_range: tuple[float, float] = (0.0, 1.0)) -> Figure:
    """Metric vs measured sparsity: one line per method/pattern/allocation, dense as a dashed
    horizontal reference. One panel per accuracy metric, then one per perplexity (log scale).

    Where the table has 95% intervals ("task/metric_lo" / "_hi", see `evaluate`), each line gets
    a shaded band and dense a grey one (`bands=False` leaves them out); points whose paired
    difference from dense is not significant ("_significant" False) get hollow markers.

    `results` is `run_sweep`'s table; its `method == "dense"` row is the reference unless `dense`
    ({"task/metric": value}) is given. Each point is labelled with its measured sparsity.
    The axes are fixed (`x_range`, y anchored on dense), so a table growing point by point
    redraws without re-zooming; metrics are named in words.
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
                    # each point's own interval as a bar, the band joins them
                    bars = ax.errorbar(shown[x], shown[metric], yerr=[shown[metric] - shown[f"{metric}_lo"],
                                                                      shown[f"{metric}_hi"] - shown[metric]],
                                       fmt="none", ecolor=line.get_color(), elinewidth=1, capsize=3)
                    bars[2][0].set_gid("interval-bar")
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
        ax.set_xlim(*x_range)
        ax.set_ylim(*_fixed_y_range(results, metric, dense, metric in perplexity))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:.0%}"))
        if metric in perplexity:
            plain = FuncFormatter(lambda value, _pos: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            low, high = ax.get_ylim()
            # minor labels only help inside one decade; across several they pile up
            ax.yaxis.set_minor_formatter(plain if high / max(low, 1e-12) < 10 else NullFormatter())
        ax.set_xlabel("measured sparsity" + (" (decoder blocks)" if x == "sparsity_blocks" else ""))
        label = _metric_label(metric)
        ax.set_ylabel(label)
        ax.set_title(label + ("\nbars and shading: 95% interval; hollow: not told apart from dense"
                              if banded else ""), fontsize=10 if banded else 11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower left" if metric in accuracy else "upper left")
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


def compare_plot(view: pd.DataFrame, title: str | None = None) -> Figure:
    """Stored runs against each other (`report.compare_view`): one panel per metric, each run's
    points by measured sparsity (a sweep's points joined by method), dense as a hollow marker."""
    metrics = [c for c in view.columns if c not in ("run", "point", "sparsity")]
    if view.empty or not metrics:
        raise ValueError("no metrics to draw: the chosen runs hold no accuracy or perplexity figures")
    fig = Figure(figsize=(1.0 + 4.6 * min(len(metrics), 3), 3.8 * math.ceil(len(metrics) / 3)))
    axes = fig.subplots(math.ceil(len(metrics) / 3), min(len(metrics), 3), squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        shown = view.dropna(subset=[metric])
        for (run, point), group in shown.groupby(["run", "point"], sort=False):
            group = group.sort_values("sparsity")
            if point == "dense":
                ax.plot(group["sparsity"], group[metric], marker="o", linestyle="none", markerfacecolor="white",
                        color="black", label=f"{run}: dense", gid="run-point")
                continue
            dense = shown[(shown["run"] == run) & (shown["point"] == "dense")]
            line = pd.concat([dense, group])  # each line starts at its run's dense figure
            ax.plot(line["sparsity"], line[metric], marker="o", markevery=list(range(len(dense), len(line))),
                    label=f"{run}: {point}", gid="run-point")
        if "perplexity" in metric.lower():
            ax.set_yscale("log")
            plain = FuncFormatter(lambda value, _pos: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            low, high = ax.get_ylim()  # minor labels only inside one decade, where no major one shows
            ax.yaxis.set_minor_formatter(plain if high / max(low, 1e-12) < 10 else NullFormatter())
        else:
            ax.set_ylim(bottom=0.0)
        ax.set_xlim(-0.02, 1.0)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:.0%}"))
        ax.set_xlabel("measured sparsity")
        ax.set_title(metric, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
