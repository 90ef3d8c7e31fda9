"""Copying decoder-block weights out and putting them back in place (workbench.snapshot)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, token_batch

from workbench import snapshot
from workbench.prune import PruneConfig, prune
from workbench.slim import slim_model

CALIB = token_batch(8, 16)


def all_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=CALIB[:2]).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])  # gpt2: Conv1D, stored transposed
def test_round_trip_is_bit_equal_and_in_place(family):
    model = tiny_model(family)
    before = all_weights(model)
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    copy = snapshot.take(model)
    assert set(copy) == set(snapshot.block_parameters(model)) and copy
    assert all(t.device.type == "cpu" for t in copy.values())
    assert snapshot.nbytes(copy) == sum(p.numel() * p.element_size()
                                        for p in snapshot.block_parameters(model).values())
    with torch.no_grad():
        for p in snapshot.block_parameters(model).values():
            p.mul_(-3.0).add_(1.0)  # the copies are not views: they keep the old values
    assert not torch.equal(next(iter(snapshot.block_parameters(model).values())), next(iter(copy.values())))
    snapshot.put_back(model, copy)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.data_ptr() == storage[name], f"{name} was reallocated, not restored in place"


def test_restore_after_pruning_gives_the_dense_model_back():
    model = tiny_model("llama")
    dense_logits = logits(model)
    dense = snapshot.take(model)
    result = prune(model, PruneConfig(method="wanda", pattern="2:4", batch_size=4), calibration=CALIB)
    assert result.summary["blocks"] == pytest.approx(0.5, abs=1e-6)
    assert not torch.equal(logits(model), dense_logits)
    snapshot.put_back(model, dense)
    assert torch.equal(logits(model), dense_logits)
    pruned_again = prune(model, PruneConfig(method="wanda", pattern="2:4", batch_size=4), calibration=CALIB)
    assert all(torch.equal(result.masks[n], pruned_again.masks[n]) for n in result.masks)  # from dense each time


def test_take_chosen_parameters_only():
    model = tiny_model("llama")
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    copy = snapshot.take(model, names)
    assert list(copy) == names
    with pytest.raises(KeyError, match="model.layers.0.mlp.nope.weight"):
        snapshot.take(model, ["model.layers.0.mlp.nope.weight"])


def test_a_slimmed_model_is_reported_and_left_untouched():
    model = tiny_model("llama")
    dense = snapshot.take(model)
    result = prune(model, PruneConfig(method="retrain-free", pattern="channel", sparsity=0.25, scope="mlp",
                                      batch_size=4), calibration=CALIB)
    slim_model(model, result)
    wrong = snapshot.mismatches(model, dense)
    assert wrong and all("mlp" in line for line in wrong)
    up = "model.layers.0.mlp.up_proj.weight"
    rows = dict(model.named_parameters())[up].shape[0]
    assert rows < 128 and f"{up}: saved (128, 64), now ({rows}, 64)" in wrong
    attention = "model.layers.0.self_attn.q_proj.weight"
    with torch.no_grad():
        dict(model.named_parameters())[attention].zero_()
    with pytest.raises(snapshot.SnapshotMismatchError, match=r"slimmed or replaced.*reload the model") as error:
        snapshot.put_back(model, dense)
    assert f"{up}: saved (128, 64), now ({rows}, 64)" in str(error.value)
    assert isinstance(error.value, ValueError)  # shown to the user as a message, not a trace
    # nothing half-restored: the tensor that would still fit was not copied either
    assert not dict(model.named_parameters())[attention].any()


def test_a_missing_parameter_is_reported():
    model = tiny_model("llama")
    copy = snapshot.take(model)
    copy["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    assert snapshot.mismatches(model, copy) == ["model.layers.9.mlp.up_proj.weight: not in the model"]
    with pytest.raises(snapshot.SnapshotMismatchError, match="1 of .* tensors"):
        snapshot.put_back(model, copy)
