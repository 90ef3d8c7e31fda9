import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import tiny_model, token_batch

from workbench import plots
from workbench.arch import describe, weight_of
from workbench.prune import PruneConfig, prune
from workbench.sparsity import by_block_and_kind, sparsity_table


def _png_ok(fig, path):
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pruned():
    model = tiny_model("llama")
    result = prune(model, PruneConfig(method="wanda", sparsity=0.5, nsamples=4, seqlen=16),
                   calibration=token_batch(4, 16))
    return model, result


def _texts(fig):
    return [t.get_text() for t in fig.axes[0].texts]


def test_sparsity_heatmap_numbers_equal_the_table(pruned, tmp_path):
    model, _ = pruned
    # make the blocks differ so a transposed or shuffled matrix would fail
    with torch.no_grad():
        weight_of(describe(model).blocks[1].linears[0].module)[:] = 0
    table = sparsity_table(model)
    fig = plots.sparsity_heatmap(table, title="t")
    matrix = by_block_and_kind(table)
    image = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(np.asarray(image), matrix.to_numpy())
    assert _texts(fig) == [f"{v:.2f}" for v in matrix.to_numpy().ravel()]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(matrix.columns)
    assert list(matrix.columns)[:3] == ["q_proj", "k_proj", "v_proj"]
    assert "1.00" in _texts(fig)
    _png_ok(fig, tmp_path / "h.png")


def test_sparsity_heatmap_counts_removed_channels():
    model = tiny_model("llama")
    layout = describe(model)
    down = layout.blocks[0].linears[-1]
    rows, cols = weight_of(down.module).shape
    # pretend half the down_proj input channels were physically removed
    table = sparsity_table(model, layout, reference_shapes={down.full_name: (rows, cols * 2)})
    fig = plots.sparsity_heatmap(table)
    matrix = by_block_and_kind(table)
    assert matrix.loc[0, down.kind] == pytest.approx(0.5)
    assert np.asarray(fig.axes[0].images[0].get_array())[0, list(matrix.columns).index(down.kind)] \
        == pytest.approx(0.5)


def test_error_heatmap(pruned, tmp_path):
    _, result = pruned
    fig = plots.error_heatmap(result.errors)
    expected = result.errors.pivot_table(index="block", columns="kind", values="error",
                                         sort=False)
    image = np.asarray(fig.axes[0].images[0].get_array())
    assert image.shape == expected.shape
    np.testing.assert_allclose(image[0, 0], result.errors.iloc[0]["error"], rtol=1e-6)
    _png_ok(fig, tmp_path / "e.png")
    with pytest.raises(ValueError, match="record_error"):
        plots.error_heatmap(result.errors.assign(error=float("nan")))


def test_mask_zoom_shows_the_crop(pruned, tmp_path):
    _, result = pruned
    mask = next(iter(result.masks.values()))
    fig = plots.mask_zoom(mask, rows=8, cols=16, row0=2, col0=4)
    image = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_array_equal(image, mask[2:10, 4:20].float().numpy())
    _png_ok(fig, tmp_path / "m.png")
    with pytest.raises(ValueError, match="outside"):
        plots.mask_zoom(mask, row0=10_000)
    with pytest.raises(ValueError, match="2-D"):
        plots.mask_zoom(mask.flatten())


def _sweep_table():
    rows = [{"method": "dense", "pattern": "", "allocation": "", "sparsity_blocks": 0.0,
             "lambada/accuracy": 0.30, "wikitext2/perplexity": 30.0}]
    for method, slope in (("magnitude", 2.0), ("wanda", 1.0)):
        for s in (0.3, 0.5, 0.7):
            rows.append({"method": method, "pattern": "unstructured", "allocation": "uniform",
                         "sparsity_blocks": s, "lambada/accuracy": 0.3 - slope * s / 10,
                         "wikitext2/perplexity": 30 * (1 + slope * s * 5)})
        rows.append({"method": method, "pattern": "2:4", "allocation": "uniform",
                     "sparsity_blocks": 0.5, "lambada/accuracy": 0.2,
                     "wikitext2/perplexity": 80.0})
    return pd.DataFrame(rows)


def test_accuracy_curve_lines_and_reference(tmp_path):
    table = _sweep_table()
    fig = plots.accuracy_curve(table)
    assert len(fig.axes) == 2
    acc, ppl = fig.axes
    for ax in (acc, ppl):
        point_lines = [line for line in ax.lines if line.get_gid() == "point-line"]
        dense_lines = [line for line in ax.lines if line.get_gid() == "dense"]
        assert len(point_lines) == 4  # magnitude, wanda, magnitude 2:4, wanda 2:4
        assert len(dense_lines) == 1
    assert {line.get_label() for line in acc.lines} == {"magnitude", "wanda", "magnitude 2:4",
                                                        "wanda 2:4", "dense"}
    dense = next(line for line in ppl.lines if line.get_gid() == "dense")
    assert dense.get_ydata()[0] == 30.0
    assert ppl.get_yscale() == "log" and acc.get_yscale() == "linear"
    wanda = next(line for line in acc.lines if line.get_label() == "wanda")
    np.testing.assert_allclose(wanda.get_xdata(), [0.3, 0.5, 0.7])
    assert {t.get_text() for t in acc.texts} >= {"30%", "50%", "70%"}
    _png_ok(fig, tmp_path / "c.png")


def test_accuracy_curve_with_explicit_dense_and_no_metrics():
    table = _sweep_table()
    fig = plots.accuracy_curve(table[table["method"] != "dense"],
                               dense={"lambada/accuracy": 0.5})
    acc, ppl = fig.axes
    assert [line.get_ydata()[0] for line in acc.lines if line.get_gid() == "dense"] == [0.5]
    assert not [line for line in ppl.lines if line.get_gid() == "dense"]
    with pytest.raises(ValueError, match="metric"):
        plots.accuracy_curve(table[["method", "sparsity_blocks"]])


def test_sensitivity_heatmap(tmp_path):
    frame = pd.DataFrame({"block": [0, 1, 2], "outlier_ratio": [0.01, 0.03, 0.02],
                          "sparsity": [0.58, 0.42, 0.5]})
    fig = plots.sensitivity_heatmap(frame)
    image = np.asarray(fig.axes[0].images[0].get_array())
    assert image.shape == (2, 3)
    np.testing.assert_allclose(image[0], [0.0, 1.0, 0.5])
    assert [t.get_text() for t in fig.axes[0].texts][:3] == ["0.01", "0.03", "0.02"]
    _png_ok(fig, tmp_path / "s.png")


def _with_intervals(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table["lambada/accuracy_lo"] = table["lambada/accuracy"] - 0.05
    table["lambada/accuracy_hi"] = table["lambada/accuracy"] + 0.05
    table["wikitext2/perplexity_lo"] = table["wikitext2/perplexity"] * 0.9
    table["wikitext2/perplexity_hi"] = table["wikitext2/perplexity"] * 1.1
    table["lambada/accuracy_significant"] = [None] + [True, False] * ((len(table) - 1) // 2) + \
        [True] * ((len(table) - 1) % 2)
    return table


def test_accuracy_curve_bands_are_in_the_png(tmp_path):
    from matplotlib.collections import PolyCollection

    from workbench.plots import png_bytes

    table = _with_intervals(_sweep_table())
    with_bands = plots.accuracy_curve(table)
    acc, ppl = with_bands.axes
    bands = [c for c in acc.collections if isinstance(c, PolyCollection) and c.get_gid() == "interval-band"]
    assert len(bands) == 4  # one per line
    wanda = next(line for line in acc.lines if line.get_label() == "wanda")
    band = bands[[line.get_label() for line in acc.lines if line.get_gid() == "point-line"].index("wanda")]
    vertices = band.get_paths()[0].vertices
    assert vertices[:, 1].min() == pytest.approx(min(wanda.get_ydata()) - 0.05)
    assert vertices[:, 1].max() == pytest.approx(max(wanda.get_ydata()) + 0.05)
    assert [p for p in acc.patches if p.get_gid() == "dense-band"]
    assert [line for line in acc.lines if line.get_gid() == "not-significant"]
    assert "95% interval" in acc.get_title()
    without = plots.accuracy_curve(table, bands=False)
    assert not [c for c in without.axes[0].collections if c.get_gid() == "interval-band"]
    assert png_bytes(with_bands) != png_bytes(plots.accuracy_curve(table, bands=False))
    # a table without intervals draws exactly as before
    plain = plots.accuracy_curve(_sweep_table())
    assert not [c for c in plain.axes[0].collections if c.get_gid() == "interval-band"]
    _png_ok(with_bands, tmp_path / "bands.png")


def test_mask_zoom_names_the_layer_and_has_a_legend(pruned):
    _, result = pruned
    name, mask = next(iter(result.masks.items()))
    fig = plots.mask_zoom(mask, layer=name)
    ax = fig.axes[0]
    assert ax.get_title().startswith(name)
    pruned_share = 1 - mask.float().mean().item()
    assert f"{pruned_share:.1%} of the layer pruned" in ax.get_title()
    legend = ax.get_legend()
    assert legend is not None and legend.get_gid() == "mask-legend"
    assert [t.get_text() for t in legend.get_texts()] == ["kept", "pruned"]


def test_sweep_curve_axes_hold_still_as_points_arrive():
    table = _with_intervals(_sweep_table())
    limits = []
    for count in (2, 4, len(table)):  # the dense row first, then point by point
        acc, ppl = plots.accuracy_curve(table.iloc[:count]).axes
        limits.append((acc.get_xlim(), acc.get_ylim(), ppl.get_xlim(), ppl.get_ylim()))
    assert limits[0] == limits[1] == limits[2]
    acc, ppl = plots.accuracy_curve(table).axes
    assert acc.get_xlim() == (0.0, 1.0) and acc.get_ylim()[0] == 0.0
    assert acc.get_ylabel() == "LAMBADA last-word accuracy" and ppl.get_ylabel() == "WikiText-2 perplexity"
    assert [t.get_text() for t in acc.get_xticklabels()][:2] == ["0%", "20%"]


def test_sweep_curve_draws_each_points_interval():
    table = _with_intervals(_sweep_table())
    acc = plots.accuracy_curve(table).axes[0]
    bars = [c for c in acc.collections if c.get_gid() == "interval-bar"]
    assert len(bars) == 4  # one set per line
    segments = [s for bar in bars for s in bar.get_segments()]
    assert len(segments) == len(table) - 1  # every point but dense
    low, high = sorted(segments, key=lambda s: s[0][0])[0][:, 1]
    assert high - low == pytest.approx(0.1)
    assert not [c for c in plots.accuracy_curve(_sweep_table()).axes[0].collections if c.get_gid() == "interval-bar"]


def test_compare_plot_one_panel_per_metric(tmp_path):
    view = pd.DataFrame({"run": ["a", "a", "b", "b"], "point": ["dense", "pruned", "dense", "wanda 2:4"],
                         "sparsity": [0.0, 0.5, 0.0, 0.5], "LAMBADA last-word accuracy": [0.3, 0.2, 0.3, 0.25],
                         "WikiText-2 perplexity": [27.0, 80.0, None, None]})
    fig = plots.compare_plot(view)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["LAMBADA last-word accuracy", "WikiText-2 perplexity"]
    assert len([line for line in visible[0].lines if line.get_gid() == "run-point"]) == 4
    assert len([line for line in visible[1].lines if line.get_gid() == "run-point"]) == 2
    assert visible[1].get_yscale() == "log"
    _png_ok(fig, tmp_path / "compare.png")
    with pytest.raises(ValueError, match="no metrics"):
        plots.compare_plot(view[["run", "point", "sparsity"]])
