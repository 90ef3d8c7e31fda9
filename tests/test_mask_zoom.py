"""The mask zoom shows what the weights hold: a weight that was zero before pruning, and kept by
the method's mask, is drawn and counted as pruned, as the sparsity heatmap counts it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from conftest import char_tokenizer
from tiny_models import tiny_model

from workbench import plots, workflow

LAYER = "model.layers.1.mlp.down_proj"  # (64, 128) in the tiny llama
ZEROED_ROWS = 16  # a quarter of its rows are zero before pruning


@pytest.fixture(scope="module")
def pruned_session(tmp_path_factory) -> tuple[workflow.Session, workflow.PruneOutcome]:
    folder = tmp_path_factory.mktemp("zeroed-rows")
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_submodule(LAYER).weight[:ZEROED_ROWS] = 0
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    session = workflow.Session()
    workflow.load(session, str(folder))
    # magnitude 2:4 keeps two of every four weights, zeros or not: the mask keeps half of the zero rows
    outcome = workflow.run_prune(session, {"method": "magnitude", "pattern": "2:4", "nsamples": 4, "seqlen": 32},
                                 zoom_layer=LAYER)
    return session, outcome


def _title(figure) -> str:
    return figure.axes[0].get_title()


def _picture(figure) -> np.ndarray:
    return np.asarray(figure.axes[0].images[0].get_array())


def test_mask_and_weights_disagree_on_the_zeroed_layer(pruned_session):
    session, outcome = pruned_session
    mask = outcome.result.masks[LAYER]
    weight = session.model.get_submodule(LAYER).weight
    assert 1 - mask.float().mean().item() == pytest.approx(0.5)
    assert bool(mask[:ZEROED_ROWS].any())  # the mask keeps weights that are zero
    counted = (weight == 0).float().mean().item()
    assert counted == pytest.approx(0.5 + 0.5 * ZEROED_ROWS / weight.shape[0])
    heatmap_row = outcome.result.sparsity.set_index("name").loc[LAYER]
    assert heatmap_row["sparsity"] == pytest.approx(counted)


def test_the_prune_outcome_zoom_shows_the_weights_share(pruned_session):
    session, outcome = pruned_session
    assert outcome.zoom_layer == LAYER
    title = _title(outcome.figures["mask_zoom"])
    assert "62.5% of the layer pruned" in title and "50.0%" not in title
    picture = _picture(outcome.figures["mask_zoom"])
    assert not picture[:ZEROED_ROWS].any()  # the zero rows are drawn pruned, whatever the mask says
    weight = session.model.get_submodule(LAYER).weight.detach()
    assert np.array_equal(picture, (weight[:64, :64] != 0).float().numpy())


def test_the_ui_zoom_of_any_layer_counts_its_weights(pruned_session):
    session, outcome = pruned_session
    figure = workflow.zoom_figure(outcome.result, LAYER, session.model)  # what both UIs draw on a pick
    assert "62.5% of the layer pruned" in _title(figure)
    without_model = workflow.zoom_figure(outcome.result, LAYER)  # the method's own mask
    assert "50.0% of the layer pruned" in _title(without_model)
    assert _picture(without_model)[:ZEROED_ROWS].any()


def test_a_slimmed_weight_counts_its_removed_rows():
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[4:] = False  # rows 4-7 removed by a channel prune
    weight = torch.ones(4, 8)
    weight[0, 0] = 0
    figure = plots.mask_zoom(mask, layer="w", weight=weight)
    assert f"{(32 + 1) / 64:.1%} of the layer pruned" in _title(figure)
    assert np.array_equal(_picture(figure), mask.float().numpy())  # where the removed rows were
    with pytest.raises(ValueError, match="does not fit"):
        plots.mask_zoom(mask, weight=torch.ones(9, 8))
