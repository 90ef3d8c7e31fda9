"""The driver's block-by-block replay must reproduce the full model's hidden states exactly."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_model, token_batch

from workbench.arch import describe
from workbench.prune import _run_block, capture_block_inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_block_replay_matches_full_forward(family):
    model = tiny_model(family)
    layout = describe(model)
    ids = token_batch(6, 24)
    with torch.no_grad():
        hidden_states = model(ids, output_hidden_states=True).hidden_states
        inputs, kwargs = capture_block_inputs(model, layout, ids, batch_size=4)
        assert [x.shape[0] for x in inputs] == [4, 2]
        for index, block in enumerate(layout.blocks):
            torch.testing.assert_close(torch.cat(inputs), hidden_states[index], rtol=0, atol=1e-6)
            inputs = _run_block(block.module, inputs, kwargs, "cpu")
