"""The driver's block-by-block replay must reproduce the full model's hidden states exactly."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_model, token_batch

from workbench.arch import describe
from workbench.prune import _attach_stats, _block_stats, _run_block, capture_block_inputs


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
            inputs = _run_block(block.module, inputs, kwargs.for_block(block.index), "cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_pass_that_stops_early_sees_every_input(family):
    """The driver's statistics pass stops each forward after the first at the last linear; the
    statistics must equal those of full forwards."""
    model = tiny_model(family)
    layout = describe(model)
    with torch.no_grad():
        inputs, kwargs = capture_block_inputs(model, layout, token_batch(6, 24), batch_size=2)
        for block in layout.blocks:
            linears = block.select("all")
            early = _block_stats(block.module, linears, inputs, kwargs.for_block(block.index), gram=True, device="cpu")
            full, detach, _ = _attach_stats(linears, gram=True, device="cpu")
            outputs = _run_block(block.module, inputs, kwargs.for_block(block.index), "cpu")
            detach()
            assert early.keys() == full.keys() == {lin.full_name for lin in linears}
            for name in full:
                assert early[name].tokens == full[name].tokens == 6 * 24
                torch.testing.assert_close(early[name].gram, full[name].gram, rtol=1e-6, atol=1e-5)
                torch.testing.assert_close(early[name].sq_sum, full[name].sq_sum, rtol=1e-6, atol=1e-5)
            inputs = outputs


def test_statistics_pass_skips_the_last_linear_after_the_first_micro_batch():
    model = tiny_model("llama")
    layout = describe(model)
    block = layout.blocks[0]
    down = next(lin for lin in block.linears if lin.role == "down")
    ran = []
    handle = down.module.register_forward_hook(lambda *_: ran.append(1))
    with torch.no_grad():
        inputs, kwargs = capture_block_inputs(model, layout, token_batch(6, 24), batch_size=2)
        stats = _block_stats(block.module, block.select("all"), inputs, kwargs.for_block(0), gram=False, device="cpu")
    handle.remove()
    assert len(ran) == 1  # three micro-batches, down_proj computed for the first only
    assert stats[down.full_name].tokens == 6 * 24
