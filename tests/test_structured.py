import pytest
import torch
from tiny_models import FAMILIES, tiny_config, tiny_model, token_batch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from workbench.arch import describe, weight_of
from workbench.flops import (
    flops_budget_to_sparsity,
    forward_flops_per_token,
    lm_head_params,
    unit_flops_per_token,
)
from workbench.methods.magnitude import magnitude_unit_scores
from workbench.methods.wanda import wanda_unit_scores
from workbench.prune import PruneConfig, prune
from workbench.slim import slim_model
from workbench.stats import InputStats
from workbench.structured import (
    StructureError,
    apply_unit_mask,
    block_geometry,
    keep_lowest_removed,
    model_geometry,
    reconstruct_columns,
    units_to_remove,
)

HEAD_FAMILIES = ["llama", "opt", "gpt2", "gptj", "gpt_neox", "bloom", "mpt", "qwen2", "mistral"]


def _capture_input(module, model, ids):
    """The input tensor `module` receives during a forward of `model`."""
    seen = {}
    handle = module.register_forward_pre_hook(
        lambda _m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen["x"].reshape(-1, seen["x"].shape[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_geometry_pairs_rows_and_columns(family):
    model = tiny_model(family)
    layout = describe(model)
    geometry = block_geometry(layout.blocks[0], layout, "channel")
    assert geometry.unit == "channel"
    assert geometry.output.linear.role == "down" and geometry.output.axis == 1
    for part in geometry.parts:
        assert part.owner.numel() == weight_of(part.linear.module).shape[part.axis]
        assert part.owner.max() == geometry.num_units - 1


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_head_rows_feed_only_their_own_head(family):
    """Zeroing one unit's q/k/v rows (fused layouts included) changes only that unit's slice of
    the o projection input; the other heads' outputs are untouched."""
    model = tiny_model(family)
    layout = describe(model)
    geometry = block_geometry(layout.blocks[0], layout, "head")
    ids = token_batch(2, 8)
    o_module = geometry.output.linear.module
    before = _capture_input(o_module, model, ids)
    victim = 1
    with torch.no_grad():
        for part in geometry.parts:
            if part.axis == 0:
                weight_of(part.linear.module)[part.owner == victim] = 0
                if getattr(part.linear.module, "bias", None) is not None:
                    part.linear.module.bias.data[part.owner == victim] = 0
    after = _capture_input(o_module, model, ids)
    mine = geometry.output.owner == victim
    torch.testing.assert_close(after[:, ~mine], before[:, ~mine])
    assert not torch.allclose(after[:, mine], before[:, mine])


def test_gqa_unit_is_a_kv_group():
    layout = describe(tiny_model("llama"))  # 4 query heads, 2 KV heads
    geometry = block_geometry(layout.blocks[0], layout, "head")
    assert (geometry.unit, geometry.num_units, geometry.heads_per_unit) == ("kv_group", 2, 2)
    q = next(p for p in geometry.parts if p.linear.role == "q")
    k = next(p for p in geometry.parts if p.linear.role == "k")
    assert int((q.owner == 0).sum()) == 2 * layout.head_dim
    assert int((k.owner == 0).sum()) == layout.head_dim


def test_gpt2_fused_qkv_rows_are_found_in_each_third():
    layout = describe(tiny_model("gpt2"))
    geometry = block_geometry(layout.blocks[0], layout, "head")
    qkv = next(p for p in geometry.parts if p.linear.role == "qkv")
    hidden, hd = layout.hidden_size, layout.head_dim
    rows = torch.nonzero(qkv.owner == 2).flatten().tolist()
    assert rows == [s * hidden + 2 * hd + i for s in range(3) for i in range(hd)]


def test_apply_unit_mask_zeroes_exactly_the_units():
    model = tiny_model("opt")
    layout = describe(model)
    geometry = block_geometry(layout.blocks[0], layout, "channel")
    keep = torch.ones(geometry.num_units, dtype=torch.bool)
    keep[[3, 7, 11]] = False
    masks = apply_unit_mask(geometry, keep)
    up = weight_of(layout.blocks[0].by_role("up")[0].module)
    down = weight_of(layout.blocks[0].by_role("down")[0].module)
    assert bool((up[[3, 7, 11]] == 0).all()) and bool((up[keep] != 0).all())
    assert bool((down[:, [3, 7, 11]] == 0).all()) and bool((down[:, keep] != 0).all())
    assert float(layout.blocks[0].by_role("up")[0].module.bias.detach()[3]) == 0.0
    for name, mask in masks.items():
        weight = weight_of(model.get_submodule(name))
        assert torch.equal(mask, weight != 0)


def test_falcon_and_single_kv_head_refuse_head_pruning():
    layout = describe(tiny_model("falcon"))
    with pytest.raises(StructureError, match="Falcon"):
        model_geometry(layout, "head")


def test_units_to_remove_refuses_emptying_a_block():
    assert units_to_remove(10, 0.25) == 2
    assert units_to_remove(1536, 0.1) == 153
    assert units_to_remove(2, 0.99) == 1  # floor never empties a block below 100%
    with pytest.raises(StructureError, match="at least one must stay"):
        units_to_remove(4, 1.0)


def test_keep_lowest_removed_drops_the_lowest():
    keep = keep_lowest_removed(torch.tensor([5.0, 1.0, 3.0, 0.5]), 2)
    assert keep.tolist() == [True, False, True, False]


def test_baseline_scores_follow_the_weights():
    model = tiny_model("llama")
    layout = describe(model)
    geometry = block_geometry(layout.blocks[0], layout, "channel")
    with torch.no_grad():
        weight_of(geometry.output.linear.module)[:, 5] *= 100
    scores = magnitude_unit_scores(geometry)
    assert int(scores.argmax()) == 5
    sq = torch.ones(geometry.num_units)
    sq[9] = 1e6
    down_stats = InputStats(geometry.num_units, gram=False)
    down_stats.add_batch(torch.diag(sq.sqrt()))  # one token per feature: squared sums are `sq`
    assert int(wanda_unit_scores(geometry, down_stats).argmax()) == 9


def test_reconstruct_columns_beats_plain_zeroing():
    torch.manual_seed(0)
    x = torch.randn(512, 32) @ torch.randn(32, 32)  # correlated inputs
    weight = torch.randn(8, 32)
    gram = x.t() @ x
    keep = torch.ones(32, dtype=torch.bool)
    keep[:8] = False
    zeroed = weight * keep
    tuned = reconstruct_columns(weight, gram, keep, percdamp=0.0001)
    assert bool((tuned[:, ~keep] == 0).all())

    def error(w):
        return float(((x @ (weight - w).t()) ** 2).sum())

    assert error(tuned) < 0.5 * error(zeroed)
    # nothing removed: the refit returns the weight itself
    torch.testing.assert_close(reconstruct_columns(weight, gram, torch.ones(32, dtype=torch.bool),
                                                   percdamp=1e-6), weight, atol=1e-3, rtol=1e-3)


# --- FLOPs budgets -------------------------------------------------------------------------


def _eager_model(family):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager").eval()


def _counted_flops_per_token(model, seqlen):
    """FLOPs per token that torch's FlopCounterMode counts in one forward. Eager attention computes
    the full seqlen x seqlen score matrix (then masks it); a causal kernel computes (seqlen + 1) /
    (2 seqlen) of it, which is what the workbench counts."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(token_batch(1, seqlen))
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert set(counts) <= {"aten.mm", "aten.addmm", "aten.bmm"}, counts
    linear = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
    attention = counts["aten.bmm"]
    return (linear + attention * (seqlen + 1) / (2 * seqlen)) / seqlen


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_forward_flops_match_a_counted_forward(family):
    model = _eager_model(family)
    layout = describe(model)
    seqlen = 24
    ours = forward_flops_per_token(layout, seqlen, lm_head_params=lm_head_params(model))
    assert ours == pytest.approx(_counted_flops_per_token(model, seqlen), rel=1e-12)
    # the LM head is counted, tied to the embeddings (GPT-2) or not
    assert lm_head_params(model) == 128 * 64
    assert ours > forward_flops_per_token(layout, seqlen, lm_head_params=0)


def test_unit_flops_of_llama_channels_and_kv_groups():
    layout = describe(tiny_model("llama"))  # hidden 64, 4 heads of 16 in 2 KV groups
    channel = model_geometry(layout, "channel")[0]
    assert unit_flops_per_token(channel, 16) == 2 * 64 * 3  # a gate row, an up row, a down column
    group = model_geometry(layout, "head")[0]
    # q rows and o columns of 2 heads, k and v rows of 1 head, attention of 2 query heads
    linears = 2 * 64 * (2 * 16 + 16 + 16 + 2 * 16)
    assert unit_flops_per_token(group, 16) == linears + 2 * (2 * 2 * 16 * (16 + 1) // 2)


@pytest.mark.parametrize("family, pattern, method, exclude, fraction", [
    ("llama", "channel", "retrain-free", None, 0.1),
    ("llama", "channel", "magnitude", r"layers\.0\.", 0.1),
    ("gpt2", "channel", "wanda", None, 0.2),
    ("llama", "head", "retrain-free", None, 0.05),
    ("opt", "head", "magnitude", None, 0.12),
])
def test_flops_budget_removes_at_least_the_fraction(family, pattern, method, exclude, fraction):
    """Counted on the slimmed model: the FLOPs removed reach the budget and overshoot it by less
    than one unit's share (global allocation) or one unit per pruned block (uniform)."""
    model = _eager_model(family)
    seqlen = 16
    dense = _counted_flops_per_token(model, seqlen)
    scope = "mlp" if pattern == "channel" else "attention"
    config = PruneConfig(method=method, pattern=pattern, scope=scope, sparsity=fraction,
                         budget="flops", seqlen=seqlen, exclude=exclude, batch_size=4)
    layout = describe(model)
    unit_share = unit_flops_per_token(model_geometry(layout, pattern)[1], seqlen) / dense
    result = prune(model, config, calibration=token_batch(8, seqlen))
    slim_model(model, result)
    removed = 1 - _counted_flops_per_token(model, seqlen) / dense
    pruned_blocks = sum(len(k) < n for k, n in zip(result.structure.kept,
                                                   result.structure.num_units))
    step = unit_share * (1 if method == "retrain-free" else pruned_blocks)
    assert fraction <= removed < fraction + step
    assert result.config.to_dict()["budget"] == "flops"
    if exclude:
        assert result.structure.kept[0] == list(range(result.structure.num_units[0]))


def test_flops_budget_uniform_needs_a_whole_unit_per_block():
    layout = describe(tiny_model("llama"))
    geometries = model_geometry(layout, "channel")
    total = forward_flops_per_token(layout, 16, lm_head_params=128 * 64)
    one_each = 2 * unit_flops_per_token(geometries[0], 16) / total
    # a budget one channel (of 256) covers: global removes 1, uniform 1 in each block
    assert flops_budget_to_sparsity(geometries, layout, one_each / 4, 16,
                                    lm_head_params=128 * 64) == 1 / 256
    assert flops_budget_to_sparsity(geometries, layout, one_each / 4, 16, lm_head_params=128 * 64,
                                    allocation="uniform") == 1 / 128
    assert flops_budget_to_sparsity(geometries, layout, 0.0, 16, lm_head_params=0) == 0.0


def test_unreachable_flops_budget_names_the_most_and_leaves_the_model_alone():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # at seqlen 16: 147456 linear + 4352 attention + 16384 LM head FLOPs per token; keeping one
    # channel per block, channels can remove 2 x 127 x 384 = 97536 of them, 57.99%
    config = PruneConfig(method="magnitude", pattern="channel", scope="mlp", sparsity=0.6,
                         budget="flops", seqlen=16)
    with pytest.raises(StructureError, match=r"60\.00% cannot be met by removing MLP channels alone"
                       r".*at most 57\.99% .*seqlen 16.*budget 'units'"):
        prune(model, config, calibration=token_batch(4, 16))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    layout = describe(model)
    with pytest.raises(StructureError, match="attention KV groups alone"):
        flops_budget_to_sparsity(model_geometry(layout, "head"), layout, 0.5, 16,
                                 lm_head_params=lm_head_params(model))
