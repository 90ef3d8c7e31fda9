import pytest
import torch
from tiny_models import tiny_config, tiny_model, token_batch
from transformers import AutoModelForCausalLM

from workbench.arch import describe, weight_of
from workbench.methods.retrain_free import (
    fisher_gradients,
    predicted_loss,
    rearrange_mask,
    search_masks,
)
from workbench.patterns import PatternError
from workbench.prune import PruneConfig, prune
from workbench.structured import Structure, StructureError, model_geometry


def _prune(family, **overrides):
    model = tiny_model(family)
    config = PruneConfig(**{"method": "retrain-free", "pattern": "channel", "scope": "mlp",
                            "sparsity": 0.25, "batch_size": 4, **overrides})
    return model, prune(model, config, calibration=token_batch(8, 16))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_channel_budget_is_met_exactly(family):
    model, result = _prune(family)
    layout = describe(model)
    total = sum(result.structure.num_units)
    removed = total - sum(len(k) for k in result.structure.kept)
    assert removed == int(0.25 * total)
    # every channel owns the same number of MLP weights, so the counted sparsity is exact
    # (tiny random weights have no zeros of their own)
    assert result.summary["mlp"] == pytest.approx(removed / total, abs=1e-12)
    assert result.summary["attention"] == 0.0
    for block in layout.blocks:
        for lin in block.select("mlp"):
            assert torch.equal(result.masks[lin.full_name], weight_of(lin.module) != 0)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "retrain-free"])
def test_uniform_allocation_removes_the_same_count_per_block(method):
    _, result = _prune("opt", method=method, unit_allocation="uniform" if method == "retrain-free"
                       else "auto", sparsity=0.1)
    assert [len(k) for k in result.structure.kept] == [128 - 12, 128 - 12]


def test_head_budget_mha_and_gqa():
    _, result = _prune("opt", pattern="head", scope="attention", sparsity=0.5)
    assert result.structure.unit == "head"
    assert sum(len(k) for k in result.structure.kept) == 4  # 8 heads, half removed
    assert result.summary["attention"] == pytest.approx(0.5)
    assert result.summary["mlp"] == 0.0
    _, result = _prune("llama", pattern="head", scope="attention", sparsity=0.5)
    assert result.structure.unit == "kv_group"
    assert [len(k) for k in result.structure.kept] == [1, 1]  # never a block's last group


def test_mask_tuning_lowers_the_down_projection_error():
    _, tuned = _prune("llama", mask_tuning=True)
    _, plain = _prune("llama", mask_tuning=False)
    assert tuned.structure.kept == plain.structure.kept  # the Fisher choice comes first
    downs_tuned = tuned.errors[tuned.errors["kind"] == "down_proj"]["error"].to_numpy()
    downs_plain = plain.errors[plain.errors["kind"] == "down_proj"]["error"].to_numpy()
    assert (downs_tuned < downs_plain).all()


def test_impossible_budgets_fail_clearly_and_leave_the_model_alone():
    model = tiny_model("llama")  # 2 blocks x 2 KV groups
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = PruneConfig(method="retrain-free", pattern="head", scope="attention", sparsity=0.75,
                         batch_size=4)
    with pytest.raises(StructureError, match="at least one"):
        prune(model, config, calibration=token_batch(4, 16))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    config = tiny_config("llama")
    config.num_key_value_heads = 1  # multi-query: every head shares one key/value head
    mqa = AutoModelForCausalLM.from_config(config)
    with pytest.raises(StructureError, match="share 1 key/value head"):
        prune(mqa, PruneConfig(method="magnitude", pattern="head", scope="attention",
                               sparsity=0.5))


@pytest.mark.parametrize("overrides, error, match", [
    ({"method": "sparsegpt"}, PatternError, "element-wise"),
    ({"pattern": "unstructured"}, PatternError, "channel"),
    ({"scope": "attention"}, ValueError, "scope 'mlp'"),
    ({"method": "wanda", "unit_allocation": "global"}, ValueError, "uniform"),
    ({"unit_allocation": "everywhere"}, ValueError, "allocation"),
    ({"budget": "macs"}, ValueError, "unknown budget 'macs'"),
    ({"method": "wanda", "pattern": "2:4", "scope": "all", "budget": "flops"}, PatternError,
     "channel/head patterns.*use budget 'units'"),
    ({"budget": "flops", "block_sparsity": [0.1, 0.1]}, ValueError, "drop block_sparsity"),
])
def test_config_errors_name_the_fix(overrides, error, match):
    config = PruneConfig(**{"method": "retrain-free", "pattern": "channel", "scope": "mlp",
                            **overrides})
    with pytest.raises(error, match=match):
        config.validate()


def test_budget_round_trips_through_a_dict():
    config = PruneConfig(method="magnitude", pattern="head", scope="attention", budget="flops")
    assert PruneConfig.from_dict(config.to_dict()) == config
    older = {k: v for k, v in config.to_dict().items() if k != "budget"}  # saved before budgets
    assert PruneConfig.from_dict(older).budget == "units"


def test_search_masks_global_keeps_one_per_block_and_meets_the_count():
    fisher = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 6.0, 7.0, 8.0])]
    keep = search_masks(fisher, 0.5, "global")
    assert sum(int((~k).sum()) for k in keep) == 3
    assert keep[0].tolist() == [False, False, True]  # block 0's last unit survives
    with pytest.raises(StructureError):
        search_masks(fisher, 0.9, "global")
    uniform = search_masks(fisher, 0.5, "uniform")
    assert [int((~k).sum()) for k in uniform] == [1, 2]


def test_rearrangement_uses_interactions():
    # units 0 and 1 cancel each other; unit 2 alone is cheap but adds to either
    grads = torch.tensor([[1.0, -1.0, 0.9], [1.0, -1.0, 0.9]])
    diag_keep = search_masks([grads.pow(2).sum(0)], 2 / 3, "uniform")[0]
    assert diag_keep.tolist() == [False, True, False]
    better = rearrange_mask(diag_keep, grads)
    assert int((~better).sum()) == 2
    assert better.tolist() == [False, False, True]
    assert predicted_loss(better, grads) < predicted_loss(diag_keep, grads)


def test_fisher_of_a_dead_channel_is_zero():
    model = tiny_model("llama")
    layout = describe(model)
    geometries = model_geometry(layout, "channel")
    with torch.no_grad():
        weight_of(geometries[0].output.linear.module)[:, 3] = 0
    said = []
    grads = fisher_gradients(model, geometries, token_batch(6, 8), batch_size=4,
                             progress=lambda fraction, message: said.append((fraction, message)))
    assert said == [(pytest.approx(4 / 6), "fisher 4/6 windows"), (1.0, "fisher 6/6 windows")]
    assert [tuple(g.shape) for g in grads] == [(6, 128), (6, 128)]
    assert float(grads[0][:, 3].abs().sum()) == 0.0
    assert float(grads[0].abs().sum()) > 0
    assert not any(p.requires_grad is False for p in model.parameters())


def test_structure_round_trips_through_a_dict():
    _, result = _prune("gpt2", sparsity=0.1)
    data = result.structure.to_dict()
    again = Structure.from_dict(data)
    assert again == result.structure
    assert again.removed_fraction == pytest.approx(int(0.1 * 512) / 512)


def test_plan_rules_come_from_the_method_records():
    from workbench.methods.unit_plan import plan_structured, resolve_allocation

    assert resolve_allocation("retrain-free", "auto") == "global"
    assert resolve_allocation("wanda", "auto") == resolve_allocation("magnitude", "auto") == "uniform"
    with pytest.raises(ValueError, match=r"wanda unit scores are not comparable across blocks; use allocation "
                                         r"'uniform' \(or method 'retrain-free' for a global choice\)"):
        resolve_allocation("wanda", "global")
    model = tiny_model("llama")
    layout = describe(model)
    with pytest.raises(ValueError, match=r"supports methods \('magnitude', 'wanda', 'retrain-free'\), not 'sparsegpt'"):
        plan_structured(model, layout, "channel", "sparsegpt", 0.5, None)
    with pytest.raises(ValueError, match="retrain-free pruning needs calibration data for its Fisher pass"):
        plan_structured(model, layout, "channel", "retrain-free", 0.5, None)
    wanda = plan_structured(model, layout, "channel", "wanda", 0.5, None)
    assert wanda.needs_stats() == "diag" and not wanda.mask_tuning and not wanda.chosen  # chosen per block later
    tuned = plan_structured(model, layout, "channel", "magnitude", 0.5, None, mask_tuning=True)
    assert tuned.needs_stats() == "gram"
    free = plan_structured(model, layout, "channel", "retrain-free", 0.5, token_batch(4, 16))
    assert free.mask_tuning and sorted(free.chosen) == [0, 1] and len(free.fisher) == 2
    assert sum(int((~keep).sum()) for keep in free.chosen.values()) == 128  # half of 2 x 128 channels
