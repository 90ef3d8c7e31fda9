"""Every block gets the keyword arguments of its own kind (sliding-window vs full attention,
each with its own mask and rotary base): the driver's block inputs must equal the model's own
hidden states on families whose blocks differ, and on one whose blocks do not."""

import pytest
import torch
import transformers as T
from tiny_models import VOCAB, tiny_model, token_batch

from workbench.arch import describe
from workbench.prune import PruneConfig, _run_block, block_kinds, capture_block_inputs, prune

SEQLEN = 24  # longer than the sliding window, so sliding and full attention differ


def layered_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)
    if family == "gemma3_text":  # different rotary base per layer type, too
        return T.Gemma3TextConfig(head_dim=16, sliding_window=4, layer_types=[
            "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"], **common)
    if family == "gemma2":
        return T.Gemma2Config(head_dim=16, sliding_window=4, **common)
    if family == "qwen2":
        return T.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=2, **common)
    raise ValueError(family)


def layered_model(family: str):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(layered_config(family), attn_implementation="eager")
    return model.eval()


def replay(model, kwargs_for):
    """Hidden states the driver feeds each block when block i gets `kwargs_for(args, i)`."""
    layout = describe(model)
    ids = token_batch(6, SEQLEN)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
        inputs, args = capture_block_inputs(model, layout, ids, batch_size=4)
        seen = []
        for block in layout.blocks:
            seen.append(torch.cat(inputs))
            inputs = _run_block(block.module, inputs, kwargs_for(args, block.index), "cpu")
    return seen, expected


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2", "qwen2"])
def test_block_inputs_match_hidden_states_with_layer_types(family):
    model = layered_model(family)
    assert len(set(block_kinds(model, 4))) == 2
    seen, expected = replay(model, lambda args, index: args.for_block(index))
    for index, hidden in enumerate(seen):
        torch.testing.assert_close(hidden, expected[index], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen2"])
def test_block_zero_arguments_for_every_block_would_be_wrong(family):
    """The check above can fail: reusing block 0's arguments everywhere diverges at the first
    block of another kind."""
    model = layered_model(family)
    kinds = block_kinds(model, 4)
    other = next(i for i, kind in enumerate(kinds) if kind != kinds[0])
    seen, expected = replay(model, lambda args, index: args.for_block(0))
    assert (seen[other + 1] - expected[other + 1]).abs().max() > 1e-3


def test_family_without_layer_types_has_one_kind():
    model = tiny_model("llama")
    assert block_kinds(model, 2) == ["block", "block"]
    seen, expected = replay(model, lambda args, index: args.for_block(index))
    for index, hidden in enumerate(seen):
        torch.testing.assert_close(hidden, expected[index], rtol=0, atol=1e-6)


def test_prune_runs_on_a_family_with_layer_types():
    model = layered_model("gemma3_text")
    result = prune(model, PruneConfig(method="sparsegpt", sparsity=0.5, batch_size=4),
                   calibration=token_batch(8, SEQLEN))
    assert abs(result.summary["blocks"] - 0.5) < 0.01
