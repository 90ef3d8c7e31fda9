import pytest
import torch
from tiny_models import tiny_model, token_batch

from workbench.arch import describe, weight_of
from workbench.methods import METHODS, elementwise_methods, magnitude, method_record, sparsegpt, wanda
from workbench.patterns import Pattern, parse_pattern
from workbench.prune import PruneConfig, prune
from workbench.stats import InputStats

# fused qkv (bloom, falcon), Conv1D (gpt2), GQA (llama), separate q/k/v with biases (opt)
FAMILY_SAMPLE = ["llama", "gpt2", "bloom", "falcon", "opt"]


def correlated_layer(rows=48, cols=64, tokens=2048, seed=0):
    """A random layer and inputs whose features are strongly correlated and unevenly scaled,
    the regime where a second-order method should clearly beat first-order scores."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    x = (torch.randn(tokens, cols, generator=g) * scale) @ mixing
    weight = torch.randn(rows, cols, generator=g)
    stats = InputStats(cols, gram=True)
    for chunk in x.split(256):
        stats.add_batch(chunk.unsqueeze(0))  # (batch, seq, features), as hooks see it
    return weight, stats, x


def output_error(weight, pruned, x):
    return float(((x @ (weight - pruned).t()) ** 2).sum() / ((x @ weight.t()) ** 2).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    weight, stats, x = correlated_layer()
    p = parse_pattern(pattern)
    errors = {}
    for name in elementwise_methods():
        new_weight, keep = METHODS[name].prune(weight.clone(), stats, p, 0.5)
        assert int((~keep).sum()) == weight.numel() // 2
        assert (new_weight[~keep] == 0).all()
        errors[name] = output_error(weight, new_weight * keep, x)
        # InputStats' Gram-based error is the same quantity computed without the tokens
        assert stats.relative_error(weight, new_weight * keep) == pytest.approx(errors[name], rel=1e-3)
    assert errors["sparsegpt"] < 0.6 * errors["wanda"], errors
    assert errors["sparsegpt"] < 0.6 * errors["magnitude"], errors
    assert errors["wanda"] < errors["magnitude"], errors


def test_wanda_compares_within_rows_and_magnitude_within_the_layer():
    weight, stats, _ = correlated_layer(rows=8, cols=32)
    weight[0] = 100.0  # one loud row: a layer-wide comparison keeps all of it
    _, keep_wanda = wanda(weight, stats, Pattern("unstructured"), 0.5)
    assert ((~keep_wanda).sum(dim=1) == 16).all()
    _, keep_mag = magnitude(weight, None, Pattern("unstructured"), 0.5)
    assert keep_mag[0].all()
    assert int((~keep_mag).sum()) == 128


def test_wanda_uses_input_norms():
    weight = torch.ones(4, 8)
    stats = InputStats(8, gram=False)
    stats.add_batch(torch.diag(torch.arange(1.0, 9.0)))  # feature j has norm j + 1
    _, keep = wanda(weight, stats, Pattern("unstructured"), 0.5)
    assert torch.equal(keep, torch.tensor([[False] * 4 + [True] * 4] * 4))


def test_sparsegpt_handles_dead_inputs_and_unequal_widths():
    weight, stats, x = correlated_layer(rows=24, cols=64)
    stats.gram[:, 3] = 0
    stats.gram[3, :] = 0  # input feature 3 never fires
    new_weight, keep = sparsegpt(weight, stats, Pattern("nm", 2, 4), 0.5, blocksize=24)
    assert torch.isfinite(new_weight).all()
    assert (keep.reshape(24, -1, 4).sum(-1) == 2).all()  # blocksize rounded to a multiple of M
    assert (new_weight[:, 3] == 0).all()


def test_method_records_say_what_each_method_needs():
    assert list(METHODS) == ["magnitude", "wanda", "sparsegpt", "retrain-free"]
    assert all(record.name == name for name, record in METHODS.items())
    assert [METHODS[name].stats for name in ("magnitude", "wanda", "sparsegpt")] == [None, "diag", "gram"]
    assert elementwise_methods() == ["magnitude", "wanda", "sparsegpt"]
    assert METHODS["magnitude"].prune is magnitude and METHODS["sparsegpt"].prune is sparsegpt
    assert not METHODS["magnitude"].needs_calibration and METHODS["wanda"].needs_calibration
    # retrain-free reads no layer statistics for its choice but back-propagates on calibration data
    free = METHODS["retrain-free"]
    assert free.stats is None and free.prune is None and free.unit_scores is None
    assert free.needs_gradients and free.needs_calibration and free.ranks_across_blocks
    assert free.mask_tuning_default and free.structured and not free.elementwise
    assert METHODS["sparsegpt"].obs_update and not METHODS["sparsegpt"].structured
    assert not any(record.obs_update for name, record in METHODS.items() if name != "sparsegpt")
    with pytest.raises(ValueError, match=r"unknown method 'obs': choose one of \['magnitude', 'retrain-free'"):
        method_record("obs")


def test_config_answers_from_the_method_record():
    assert PruneConfig(method="sparsegpt").collects_gram
    assert not PruneConfig(method="wanda", record_error=False).collects_gram
    assert not PruneConfig(method="magnitude").uses_calibration
    free = PruneConfig(method="retrain-free", pattern="channel", scope="mlp", record_error=False)
    assert free.uses_calibration and free.tunes_masks and free.collects_gram
    untuned = PruneConfig(method="retrain-free", pattern="channel", scope="mlp", record_error=False,
                          mask_tuning=False)
    assert untuned.uses_calibration and not untuned.collects_gram
    # a data-free unit score with mask tuning still reads calibration data for the refit
    tuned = PruneConfig(method="magnitude", pattern="channel", scope="mlp", mask_tuning=True)
    assert tuned.uses_calibration and tuned.collects_gram and not tuned.reports_error
    assert PruneConfig(method="nope").uses_calibration  # answered before validate(), which refuses it


def _counted(model):
    layout = describe(model)
    zeros = numel = 0
    for block in layout.blocks:
        for lin in block.linears:
            w = weight_of(lin.module)
            zeros += int((w == 0).sum())
            numel += w.numel()
    return zeros / numel


@pytest.mark.parametrize("family", FAMILY_SAMPLE)
@pytest.mark.parametrize("method", sorted(elementwise_methods()))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_each_method_on_each_family(family, method, pattern):
    model = tiny_model(family)
    ids = token_batch(4, 16)
    # record_error=True: the error report is asked for, so magnitude reads the calibration too
    result = prune(model, PruneConfig(method=method, pattern=pattern, sparsity=0.5, record_error=True),
                   calibration=ids)
    assert _counted(model) == pytest.approx(0.5, abs=1e-9)
    assert result.summary["blocks"] == pytest.approx(0.5, abs=1e-9)
    for block in describe(model).blocks:
        for lin in block.linears:
            weight, keep = weight_of(lin.module), result.masks[lin.full_name]
            assert keep.shape == weight.shape
            assert (weight[~keep] == 0).all()
            if pattern == "2:4":
                assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert result.errors["error"].notna().all()
    assert (result.errors["error"] > 0).all()


@pytest.mark.parametrize("width", [48, 300, 577])
def test_gram_accumulation_matches_a_float64_product(width):
    stats = InputStats(width, gram=True)
    batches = [torch.randn(2, 40, width) for _ in range(3)]
    stats.add_batch(batches[0])
    first = stats.gram.clone()  # read between batches: later batches must still add up
    stats.add_batch(batches[1])
    stats.add_batch(batches[2])
    x = torch.cat([b.reshape(-1, width) for b in batches]).double()
    x0 = batches[0].reshape(-1, width).double()
    assert torch.allclose(first.double(), x0.t() @ x0, atol=1e-3)
    assert torch.allclose(stats.gram.double(), x.t() @ x, atol=1e-3)
    assert torch.equal(stats.gram, stats.gram.t())
    assert stats.tokens == 240
    assert torch.allclose(stats.sq_sum.double(), (x * x).sum(0), atol=1e-3)
