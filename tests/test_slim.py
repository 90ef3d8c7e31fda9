import pytest
import torch
from tiny_models import tiny_model, token_batch
from transformers import AutoModelForCausalLM

from workbench.arch import describe, weight_of
from workbench.prune import PruneConfig, prune
from workbench.saving import UnsafeDestinationError
from workbench.slim import final_sizes, load_slimmed, save_slimmed, slim_model
from workbench.sparsity import sparsity_summary
from workbench.structured import StructureError

CASES = [("llama", "channel"), ("llama", "head"), ("opt", "channel"), ("opt", "head"),
         ("gpt2", "channel"), ("gpt2", "head")]


def _pruned(family, pattern, method="retrain-free", sparsity=0.4, **overrides):
    model = tiny_model(family)
    scope = "mlp" if pattern == "channel" else "attention"
    config = PruneConfig(method=method, pattern=pattern, scope=scope, sparsity=sparsity,
                         batch_size=4, **overrides)
    return model, prune(model, config, calibration=token_batch(8, 16))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family, pattern", CASES)
def test_slimmed_logits_equal_masked_logits(family, pattern):
    model, result = _pruned(family, pattern)
    ids = token_batch(2, 12, seed=1)
    masked = _logits(model, ids)
    masked_summary = result.summary
    slim = slim_model(model, result)
    torch.testing.assert_close(_logits(model, ids), masked, atol=1e-4, rtol=1e-4)
    assert slim.parameters_after < slim.parameters_before
    # removed rows/columns count as zeros against the dense shapes
    counted = sparsity_summary(model, reference_shapes=slim.reference_shapes)
    group = "mlp" if pattern == "channel" else "attention"
    assert counted[group] == pytest.approx(masked_summary[group], abs=1e-9)
    assert counted["matmul"] == pytest.approx(masked_summary["matmul"], abs=1e-9)
    # nothing that was kept is zero any more: the zeros are gone from memory
    out = describe(model).blocks[0].by_role("down" if pattern == "channel" else "o")[0]
    assert bool((weight_of(out.module) != 0).any(dim=0).all())


def test_round_to_and_uniform_pad_with_zero_channels():
    model, result = _pruned("llama", "channel", sparsity=0.3)
    kept = [len(k) for k in result.structure.kept]
    sizes = final_sizes(result.structure, round_to=32, uniform=True)
    assert len(set(sizes)) == 1 and sizes[0] % 32 == 0 and sizes[0] >= max(kept)
    ids = token_batch(2, 12, seed=2)
    masked = _logits(model, ids)
    slim = slim_model(model, result, round_to=32, uniform=True)
    assert slim.sizes == sizes
    torch.testing.assert_close(_logits(model, ids), masked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family, pattern", [("llama", "channel"), ("llama", "head"),
                                             ("opt", "channel"), ("gpt2", "channel")])
def test_uniform_slim_reloads_with_stock_from_pretrained(tmp_path, family, pattern):
    model, result = _pruned(family, pattern, method="magnitude", sparsity=0.5)
    ids = token_batch(2, 12, seed=3)
    masked = _logits(model, ids)
    slim = slim_model(model, result, uniform=True)
    assert slim.stock_loadable
    folder = save_slimmed(model, None, tmp_path / "slim")
    stock = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(_logits(stock, ids), masked, atol=1e-4, rtol=1e-4)
    assert stock.num_parameters() == slim.parameters_after


@pytest.mark.parametrize("family, pattern", [("llama", "channel"), ("opt", "head"),
                                             ("gpt2", "head")])
def test_non_uniform_slim_reloads_through_workbench(tmp_path, family, pattern):
    model, result = _pruned(family, pattern, sparsity=0.4)
    ids = token_batch(2, 12, seed=4)
    masked = _logits(model, ids)
    slim_model(model, result)
    folder = save_slimmed(model, None, tmp_path / "slim")
    loaded = load_slimmed(folder)
    assert loaded.kind == "folder"
    torch.testing.assert_close(_logits(loaded.model, ids), masked, atol=1e-4, rtol=1e-4)


def test_save_refuses_a_non_empty_folder_and_leaves_no_temp(tmp_path):
    model, result = _pruned("llama", "channel", method="magnitude")
    slim_model(model, result)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # not ours: never replaced, overwrite or not
        with pytest.raises(UnsafeDestinationError, match="overwrite"):
            save_slimmed(model, None, target, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "keep.txt").read_text() == "mine"
    (target / "keep.txt").unlink()
    save_slimmed(model, None, target)  # an empty folder is fine
    with pytest.raises(FileExistsError, match="overwrite"):  # ours: replaced only when asked
        save_slimmed(model, None, target)
    save_slimmed(model, None, target, overwrite=True)
    assert (target / "config.json").is_file() and not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_slim_refuses_what_it_cannot_remove():
    model = tiny_model("llama")
    result = prune(model, PruneConfig(method="magnitude", pattern="unstructured", sparsity=0.5,
                                      record_error=False))
    with pytest.raises(StructureError, match="element-wise"):
        slim_model(model, result)
    bloom, result = _pruned("bloom", "head", method="magnitude", sparsity=0.5)
    with pytest.raises(StructureError, match="ALiBi"):
        slim_model(bloom, result)
    model, result = _pruned("llama", "channel", method="magnitude")
    slim_model(model, result)
    with pytest.raises(StructureError, match="already slimmed"):
        slim_model(model, result)


@pytest.mark.slow
def test_bundled_model_slims_to_the_same_logits():
    from workbench.models import load_model

    loaded = load_model("default")  # a private copy: the session fixture must stay dense
    ids = loaded.tokenizer("The capital of France is Paris. The capital of Italy is",
                           return_tensors="pt")["input_ids"]
    calibration = torch.randint(100, 30000, (2, 32), generator=torch.Generator().manual_seed(0))
    # Fisher search only (tuning and error reports are covered on tiny models): seconds, not
    # minutes, on two cores
    config = PruneConfig(method="retrain-free", pattern="channel", scope="mlp", sparsity=0.1,
                         batch_size=2, mask_tuning=False, record_error=False)
    result = prune(loaded.model, config, calibration=calibration)
    assert result.structure.removed_fraction == pytest.approx(int(0.1 * 30 * 1536) / (30 * 1536))
    masked = _logits(loaded.model, ids)
    slim = slim_model(loaded.model, result, round_to=32)
    assert all(size % 32 == 0 or size == 1536 for size in slim.sizes)
    torch.testing.assert_close(_logits(loaded.model, ids), masked, atol=1e-4, rtol=1e-4)
