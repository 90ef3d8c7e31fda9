import pytest
import torch
from tiny_models import tiny_model, token_batch

from workbench.allocation import (
    block_sensitivity,
    block_weights,
    outlier_ratios,
    owl_allocation,
    owl_block_sparsity,
)
from workbench.arch import describe, weight_of
from workbench.prune import PruneConfig, collect_dense_stats, prune
from workbench.sweep import snapshot_weights

CALIB = token_batch(8, 16)


def weighted_mean(values, weights):
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def test_owl_allocation_keeps_the_budget_and_favours_outlier_blocks():
    ratios = [0.01, 0.05, 0.02, 0.03]
    weights = [1, 1, 2, 1]
    allocation = owl_allocation(ratios, 0.6, lam=0.08, weights=weights)
    assert weighted_mean(allocation, weights) == pytest.approx(0.6, abs=1e-6)
    # more outliers, less sparsity; the spread is 2 * lam
    assert allocation[1] == min(allocation) and allocation[0] == max(allocation)
    assert max(allocation) - min(allocation) == pytest.approx(0.16, abs=1e-6)


def test_owl_allocation_clips_and_still_keeps_the_budget():
    allocation = owl_allocation([0.0, 1.0, 0.5], 0.95, lam=0.08)
    assert max(allocation) <= 0.99
    assert sum(allocation) / 3 == pytest.approx(0.95, abs=1e-6)


def test_owl_allocation_edge_cases():
    assert owl_allocation([0.2, 0.2, 0.2], 0.5) == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="lam"):
        owl_allocation([0.1, 0.2], 0.5, lam=1.5)
    with pytest.raises(ValueError, match="weights"):
        owl_allocation([0.1, 0.2], 0.5, weights=[1])
    with pytest.raises(ValueError, match="no blocks"):
        owl_allocation([], 0.5)


def test_outlier_ratio_definition_and_planted_outliers():
    model = tiny_model("llama")
    cache = collect_dense_stats(model, PruneConfig(method="wanda"), calibration=CALIB, gram=False)
    before = outlier_ratios(model, cache, m=5.0)
    block = describe(model).blocks[1]
    scores = torch.cat([(weight_of(lin.module).abs()
                         * cache.dense_stats[lin.full_name].sq_sum.sqrt()).flatten()
                        for lin in block.linears])
    assert before[1] == pytest.approx(float((scores > 5 * scores.mean()).sum()) / scores.numel())
    assert outlier_ratios(model, cache, m=2.0)[1] > before[1]
    with torch.no_grad():  # a few large weights in block 1 only
        weight_of(block.linears[0].module).view(-1)[:100] *= 10
    after = outlier_ratios(model, cache)
    assert after[1] > before[1]
    assert after[0] == before[0]


def test_owl_block_sparsity_plugs_into_the_driver():
    model = tiny_model("llama")
    with torch.no_grad():
        weight_of(describe(model).blocks[0].linears[0].module).view(-1)[:300] *= 50
    allocation = owl_block_sparsity(model, CALIB, target=0.5, lam=0.08)
    weights = block_weights(model)
    assert len(allocation) == 2
    assert weighted_mean(allocation, weights) == pytest.approx(0.5, abs=1e-6)
    assert allocation[0] < allocation[1]  # the outlier block is spared
    assert allocation[1] - allocation[0] == pytest.approx(0.16, abs=1e-6)

    result = prune(model, PruneConfig(method="wanda", sparsity=0.5, block_sparsity=allocation),
                   calibration=CALIB)
    table = result.sparsity
    per_block = table.groupby("block")["zeros"].sum() / table.groupby("block")["numel"].sum()
    # Wanda rounds per row: a 64-wide row keeps whole weights
    assert per_block.to_numpy() == pytest.approx(allocation, abs=0.02)
    assert result.summary["blocks"] == pytest.approx(0.5, abs=0.02)


def test_block_sensitivity_restores_weights():
    model = tiny_model("llama")
    before = snapshot_weights(model)
    frame = block_sensitivity(model, CALIB, target=0.9, method="magnitude")
    assert list(frame["block"]) == [0, 1]
    assert frame["loss"].notna().all() and (frame["loss_increase"].abs() > 0).all()
    assert frame["outlier_ratio"].between(0, 1).all()
    after = snapshot_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(ValueError, match="unknown method"):
        block_sensitivity(model, CALIB, target=0.5, method="nope")


def test_block_sensitivity_refuses_a_method_without_an_element_wise_form():
    with pytest.raises(ValueError, match="retrain-free removes whole channels or heads: block sensitivity prunes "
                                         r"single weights, choose one of \['magnitude', 'sparsegpt', 'wanda'\]"):
        block_sensitivity(tiny_model("llama"), CALIB, target=0.5, method="retrain-free")


def test_outlier_ratios_count_wanda_scores_above_m_times_the_block_mean():
    from workbench.methods.wanda import wanda_scores

    model = tiny_model("llama")
    cache = collect_dense_stats(model, PruneConfig(method="wanda"), calibration=CALIB, gram=False)
    block = describe(model).blocks[1]
    with torch.no_grad():  # one loud input feature in block 1's down projection
        weight_of(block.select("mlp")[-1].module)[:, 3] *= 1000
    scores = torch.cat([wanda_scores(weight_of(lin.module).float(), cache.dense_stats[lin.full_name]).flatten()
                        for lin in block.select("all")])
    ratios = outlier_ratios(model, cache, m=5.0)
    assert ratios[1] == pytest.approx(float((scores > 5.0 * scores.mean()).float().mean()))
    assert ratios[1] > 0
