"""Result tables as read on screen: the change in words, rounding for display only, the most
pruned layer, stored runs cut to the chosen metrics."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from workbench import report


def _comparison(significant=None) -> pd.DataFrame:
    frame = pd.DataFrame({"metric": ["LAMBADA last-word accuracy", "WikiText-2 perplexity"],
                          "dense": [0.3125, 27.4123456], "sparse": [0.1875, 79.5], "relative drop (%)": [-40.0, 190.0]})
    if significant is not None:
        frame["significant"] = significant
    return frame


def _seed_rows(count: int) -> pd.DataFrame:
    return pd.DataFrame([{"Evaluation dataset": "lambada_openai", "Sparsity pattern": "2:4",
                          "Over MLP block sparsity": "0.5000", "Element-wise/matmul ratio": "0.5000",
                          "Method": "wanda", "Calibration dataset": "wikitext2 (4x32)", "Model": "tiny"}] * count)


@pytest.mark.parametrize(("metric", "dense", "pruned", "significant", "words"), [
    ("LAMBADA last-word accuracy", 0.3125, 0.1875, None, "accuracy -12.5 points"),
    ("LAMBADA last-word accuracy", 0.25, 0.27, True, "accuracy +2.0 points"),
    ("LAMBADA last-word accuracy", 0.3, 0.3, False, "accuracy +0.0 points (within noise)"),
    ("WikiText-2 perplexity", 27.4, 79.46, None, "perplexity x2.9"),
    ("WikiText-2 perplexity", 20.0, 19.0, None, "perplexity x0.95"),
    ("WikiText-2 perplexity", 10.0, 52_345.0, None, "perplexity x5,234"),
    ("WikiText-2 perplexity", math.nan, 3.0, None, "-"),
])
def test_change_words(metric, dense, pruned, significant, words):
    assert report.change_words(metric, dense, pruned, significant) == words


def test_results_view_leads_with_the_figures_and_keeps_every_digit():
    view = report.results_view(_comparison([True, False]), _seed_rows(2))
    assert list(view.columns[:4]) == ["Metric", "Dense", "Pruned", "Change"]
    assert list(view.columns) == report.RESULTS_COLUMNS
    assert view["Dense"].tolist() == [0.3125, 27.4123456]  # full precision for downloads
    assert view["Change"].tolist() == ["accuracy -12.5 points", "perplexity x2.9 (within noise)"]
    assert set(view["Method"]) == {"wanda"}
    html = report.styled(view).to_html()  # rounded on screen only
    assert "31.25%" in html and "18.75%" in html and "27.41" in html and "27.4123456" not in html


def test_results_view_without_an_evaluation_has_one_row_of_context():
    view = report.results_view(pd.DataFrame(), _seed_rows(1))
    assert len(view) == 1 and view.loc[0, "Metric"] == "-" and view.loc[0, "Change"] == "-"
    assert math.isnan(view.loc[0, "Dense"]) and view.loc[0, "Sparsity pattern"] == "2:4"


def test_most_pruned_layer_counts_from_the_weights():
    from types import SimpleNamespace

    masks = {name: torch.ones(2, 2, dtype=torch.bool) for name in ("a", "b", "c")}
    sparsity = pd.DataFrame({"name": ["a", "b", "c"], "sparsity": [0.5, 0.9, 0.9]})
    assert report.most_pruned_layer(SimpleNamespace(masks=masks, sparsity=sparsity)) == "b"  # the first of a tie
    assert report.most_pruned_layer(SimpleNamespace(masks={}, sparsity=sparsity)) is None
    assert report.most_pruned_layer(SimpleNamespace(masks=masks, sparsity=pd.DataFrame())) == "a"


def test_compare_view_keeps_the_chosen_metrics_of_prunes_and_sweeps():
    wide = pd.DataFrame([
        {"run": "p1", "status": "done", "sparsity/matmul": 0.5, "dense/lambada/accuracy": 0.31234,
         "sparse/lambada/accuracy": 0.2, "dense/wikitext2/perplexity": 27.0, "sparse/wikitext2/perplexity": 80.0,
         "dense/lambada/accuracy_ci": "[0.2, 0.4]", "timings/prune_s": 1.23},
        {"run": "s1", "status": "done", "method": "dense", "sparsity_blocks": 0.0, "lambada/accuracy": 0.31},
        {"run": "s1", "status": "done", "method": "wanda", "pattern": "2:4", "allocation": "uniform",
         "sparsity_blocks": 0.5, "lambada/accuracy": 0.22},
    ])
    view = report.compare_view(wide)
    assert list(view.columns) == ["run", "point", "sparsity", "LAMBADA last-word accuracy", "WikiText-2 perplexity"]
    assert view[["run", "point"]].values.tolist() == [["p1", "dense"], ["p1", "pruned"], ["s1", "dense"],
                                                      ["s1", "wanda 2:4"]]
    assert view["sparsity"].tolist() == [0.0, 0.5, 0.0, 0.5]
    assert view.loc[0, "LAMBADA last-word accuracy"] == 0.31234
    only_accuracy = report.compare_view(wide, ("accuracy",))
    assert "WikiText-2 perplexity" not in only_accuracy.columns
    html = report.styled(view).to_html()
    assert "31.23%" in html and "80.00" in html and "50.0%" in html
    assert report.compare_view(wide[["run", "status"]]).empty
