"""The blocked SparseGPT solve against the textbook per-column loop, the shared factor, and the
stacked solve of layers that share an input against each layer solved alone."""

import importlib
import threading

import pytest
import torch
from tiny_models import tiny_model, token_batch

from workbench import solve_groups
from workbench.arch import describe
from workbench.methods import column_sweep, inverse_hessian
from workbench.methods.sparsegpt import inverse_hessian_factor, sparsegpt, sparsegpt_joint
from workbench.patterns import parse_pattern
from workbench.prune import PruneConfig, _block_stats, capture_block_inputs, prune
from workbench.solve_groups import input_groups
from workbench.stats import InputStats

# the module, not the `sparsegpt` function that workbench.methods exports under its name
sparsegpt_module = importlib.import_module("workbench.methods.sparsegpt")


def textbook_sparsegpt(weight, hessian, pattern, sparsity, blocksize, percdamp=0.01):
    """SparseGPT as the paper's reference code writes it: one column at a time, each removal's
    error pushed onto the rest of its lazy block by a rank-1 update, then onto the later blocks."""
    W = weight.clone().float()
    H = hessian.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0])
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows, cols = W.shape
    if pattern.kind == "nm":
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern.kind == "unstructured":
            saliency = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = int(saliency.numel() * sparsity)
            mask1.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if pattern.kind == "nm" and i % pattern.m == 0:
                saliency = W1[:, i:i + pattern.m] ** 2 / torch.diag(Hinv1)[i:i + pattern.m].reshape(1, -1) ** 2
                lowest = torch.topk(saliency, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + lowest, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, ~pruned


def random_layer(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = (torch.randn(4 * cols, cols, generator=g) * torch.logspace(-1, 1, cols)) @ mixing
    stats = InputStats(cols, gram=True)
    stats.add_batch(x)
    return torch.randn(rows, cols, generator=g), stats


CASES = [  # pattern, rows, cols, blocksize: partial last blocks, blocks narrower than a sub-block
    ("unstructured", 40, 100, 32), ("unstructured", 72, 96, 128), ("unstructured", 24, 50, 7),
    ("2:4", 40, 104, 32), ("2:4", 96, 64, 128), ("2:4", 24, 48, 6),
    ("4:8", 40, 104, 32), ("4:8", 64, 96, 128), ("4:8", 16, 48, 8),
]


@pytest.mark.parametrize("pattern, rows, cols, blocksize", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_blocked_solve_equals_the_textbook_loop(pattern, rows, cols, blocksize, seed):
    weight, stats = random_layer(rows, cols, seed)
    p = parse_pattern(pattern)
    expected_weight, expected_keep = textbook_sparsegpt(weight, stats.hessian(), p, 0.6, blocksize)
    new_weight, keep = sparsegpt(weight.clone(), stats, p, 0.6, blocksize=blocksize)
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(new_weight, expected_weight, rtol=1e-4, atol=1e-4 * float(weight.abs().max()))
    assert (new_weight[~keep] == 0).all()


def test_dead_inputs_match_the_textbook_loop():
    weight, stats = random_layer(32, 64, seed=2)
    x = torch.randn(512, 64)
    x[:, [3, 17, 40]] = 0.0  # inputs that never fire
    stats = InputStats(64, gram=True)
    stats.add_batch(x)
    p = parse_pattern("unstructured")
    expected_weight, expected_keep = textbook_sparsegpt(weight, stats.hessian(), p, 0.5, 16)
    new_weight, keep = sparsegpt(weight.clone(), stats, p, 0.5, blocksize=16)
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(new_weight, expected_weight, rtol=1e-4, atol=1e-4 * float(weight.abs().max()))


def test_linears_sharing_statistics_share_one_factor_until_the_statistics_change():
    _, stats = random_layer(8, 32, seed=3)
    first = inverse_hessian_factor(stats, 0.01)
    assert inverse_hessian_factor(stats, 0.01) is first  # q, k and v reuse it
    assert inverse_hessian_factor(stats, 0.1) is not first  # other dampening, other factor
    stats.add_batch(torch.randn(64, 32))
    grown = inverse_hessian_factor(stats, 0.01)
    assert grown is not first
    assert not torch.allclose(grown.upper, first.upper)
    _, other = random_layer(8, 32, seed=3)  # equal values, another object: not trusted as equal
    assert inverse_hessian_factor(other, 0.01) is not grown


def test_thread_count_is_restored():
    weight, stats = random_layer(16, 32, seed=4)
    before = torch.get_num_threads()
    sparsegpt(weight, stats, parse_pattern("2:4"), 0.5, blocksize=16)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("blocksize", [16, 128])
def test_stacked_solve_equals_each_layer_solved_alone(pattern, blocksize):
    _, stats = random_layer(8, 64, seed=5)
    g = torch.Generator().manual_seed(6)
    # q, k, v of different widths; k's weights ten times larger, so a mask chosen over the stacked
    # rows would prune far less of k than a per-layer one
    weights = [torch.randn(40, 64, generator=g), 10 * torch.randn(16, 64, generator=g),
               torch.randn(24, 64, generator=g)]
    p = parse_pattern(pattern)
    joint = sparsegpt_joint([w.clone() for w in weights], stats, p, 0.6, blocksize=blocksize)
    for weight, (new_weight, keep) in zip(weights, joint):
        alone_weight, alone_keep = sparsegpt(weight.clone(), stats, p, 0.6, blocksize=blocksize)
        assert torch.equal(keep, alone_keep)
        assert torch.allclose(new_weight, alone_weight, rtol=1e-5, atol=1e-5 * float(weight.abs().max()))
        expected = 0.5 if p.kind == "nm" else 0.6
        assert (~keep).float().mean().item() == pytest.approx(expected, abs=0.02)


def test_stacked_solve_refuses_layers_of_different_input_widths():
    _, stats = random_layer(8, 32, seed=7)
    with pytest.raises(ValueError, match="one input width"):
        sparsegpt_joint([torch.randn(8, 32), torch.randn(8, 16)], stats, parse_pattern("2:4"), 0.5)


@pytest.mark.parametrize("family, groups", [
    ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ("opt", [["k_proj", "v_proj", "q_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
    ("gpt2", [["c_attn"], ["c_proj"], ["c_fc"], ["c_proj"]]),
])
def test_linears_are_grouped_by_the_input_they_share(family, groups):
    model = tiny_model(family)
    layout = describe(model)
    inputs, kwargs = capture_block_inputs(model, layout, token_batch(4, 16), batch_size=2)
    block = layout.blocks[0]
    stats = _block_stats(block.module, block.linears, inputs, kwargs.for_block(0), gram=False, device="cpu")
    found = [[lin.kind for lin in group] for group in input_groups(block.linears, stats)]
    assert found == groups


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("concurrent", [True, False])
def test_driver_stacked_solves_equal_per_layer_solves(family, pattern, concurrent, monkeypatch):
    config = PruneConfig(method="sparsegpt", pattern=pattern, sparsity=0.5, blocksize=16, batch_size=4)
    ids = token_batch(8, 16)
    per_layer_model = tiny_model(family)
    with monkeypatch.context() as patch:
        patch.delattr(sparsegpt, "solve_joint")  # a method without a stacked solve
        expected = prune(per_layer_model, config, calibration=ids)
    if not concurrent:
        monkeypatch.setattr(solve_groups, "CONCURRENT_MAX_WEIGHTS", 0)
    model = tiny_model(family)
    threads = torch.get_num_threads()
    result = prune(model, config, calibration=ids)
    assert torch.get_num_threads() == threads
    assert list(result.masks) == list(expected.masks)
    for name, keep in result.masks.items():
        assert torch.equal(keep, expected.masks[name]), name
    for (name, p), q in zip(model.named_parameters(), per_layer_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name
    assert list(result.errors["name"]) == list(expected.errors["name"])
    # measured inside the stacked solves, in the driver for the per-layer ones
    assert list(result.errors["error"]) == pytest.approx(list(expected.errors["error"]), rel=1e-3)


def test_factor_is_the_textbook_factor_and_reports_its_damping():
    _, stats = random_layer(8, 96, seed=8)
    hessian = stats.hessian()
    damping = 0.01 * torch.diagonal(hessian).mean()
    damped = hessian + damping * torch.eye(96)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    factor = inverse_hessian_factor(stats, 0.01)
    assert torch.allclose(factor.upper, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(factor.upper, torch.triu(factor.upper))
    assert float(factor.damping) == pytest.approx(float(damping), rel=1e-6)
    assert torch.allclose(factor.upper.t() @ factor.upper @ damped, torch.eye(96), atol=1e-3)


def test_factor_of_a_singular_hessian_raises_the_damping_it_reports():
    x = torch.randn(256, 4) @ torch.randn(4, 48)  # rank 4 of 48 inputs
    stats = InputStats(48, gram=True)
    stats.add_batch(x)
    hessian = stats.hessian()
    factor = inverse_hessian_factor(stats, 1e-9)
    assert float(factor.damping) > 1e-9 * float(torch.diagonal(hessian).mean())  # retried with more
    def inverse_at(damping):  # float64, so only the factor's own rounding is measured
        return torch.linalg.inv(hessian.double() + float(damping) * torch.eye(48, dtype=torch.float64))

    upper = factor.upper.double()
    found = upper.t() @ upper
    assert torch.linalg.norm(found - inverse_at(factor.damping)) < 0.1 * torch.linalg.norm(found)
    assert torch.linalg.norm(found - inverse_at(factor.damping / 10)) > 0.5 * torch.linalg.norm(found)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_cholesky_inverse_and_reversal_in_place(n, monkeypatch):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3 * n, n, generator=g)
    spd = x.t() @ x + torch.eye(n)
    lower = torch.linalg.cholesky(spd)
    for lapack in (True, False):  # SciPy's LAPACK (CPU) and the torch ops other devices use
        work = spd.clone()
        storage = work.data_ptr()
        assert inverse_hessian._cholesky_in_place(work, lapack)
        assert torch.allclose(work, lower, atol=1e-4) and torch.equal(work, torch.tril(work))
        inverse_hessian._invert_lower_in_place(work, lapack)
        assert work.data_ptr() == storage
        assert torch.allclose(work @ lower, torch.eye(n), atol=1e-4)
        not_definite = -spd.clone()
        assert not inverse_hessian._cholesky_in_place(not_definite, lapack)
    monkeypatch.setattr(inverse_hessian, "_REVERSE_CHUNK", 5)  # many chunks, a partial last one
    reversed_ = spd.clone()
    inverse_hessian._reverse_in_place(reversed_)
    assert torch.equal(reversed_, spd.flip(0, 1))


@pytest.mark.parametrize("n", [300, 601])
def test_factor_by_halves_equals_the_lapack_factor(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g) * torch.logspace(-1, 1, n)
    spd = x.t() @ x / (2 * n) + 0.01 * torch.eye(n)
    expected = spd.clone()
    assert inverse_hessian._upper_factor_whole(expected, lapack=True)
    halves = spd.clone()
    assert inverse_hessian._upper_factor_by_halves(halves)  # 601: uneven halves, non-contiguous leaves
    assert torch.equal(halves, torch.triu(halves))
    assert torch.allclose(halves, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    not_definite = spd.clone()
    not_definite[n - 1, n - 1] = -1.0  # found in the first leaf
    assert not inverse_hessian._upper_factor_by_halves(not_definite)
    not_definite = spd.clone()
    not_definite[0, 0] = -1.0  # found only after the first half's update
    assert not inverse_hessian._upper_factor_by_halves(not_definite)


def test_factor_temporaries_are_counted_where_the_factor_makes_them():
    low, high = inverse_hessian._HALVES_MIN, inverse_hessian._HALVES_MAX
    assert inverse_hessian.factor_temporary_bytes(low - 1) == 0  # LAPACK in place
    assert inverse_hessian.factor_temporary_bytes(high + 1) == 0
    assert inverse_hessian.factor_temporary_bytes(high) == high * high * 4 // 2  # half a Hessian
    assert inverse_hessian.factor_temporary_bytes(100, "cuda") == 100 * 100 * 4


def test_wide_layers_factored_by_halves_match_the_textbook_loop():
    assert inverse_hessian._HALVES_MIN <= 300 <= inverse_hessian._HALVES_MAX
    weight, stats = random_layer(16, 300, seed=3)
    for pattern in ("unstructured", "2:4"):
        p = parse_pattern(pattern)
        expected_weight, expected_keep = textbook_sparsegpt(weight, stats.hessian(), p, 0.5, 128)
        new_weight, keep = sparsegpt(weight.clone(), stats, p, 0.5)
        assert torch.equal(keep, expected_keep)
        assert torch.allclose(new_weight, expected_weight, rtol=1e-4, atol=1e-4 * float(weight.abs().max()))


@pytest.fixture(params=["numba", "torchscript"])
def cpu_sweep(request, monkeypatch):
    """Which compiled sweep SparseGPT runs on CPU: numba's (the default), or TorchScript's, the
    one it falls back to without numba."""
    if request.param == "torchscript":
        monkeypatch.setattr(column_sweep, "sweep_lazy_block", lambda: None)
    sweep = sparsegpt_module._sweep_for(torch.device("cpu"))
    if request.param == "numba":
        assert sweep is column_sweep._sweep_lazy_block  # numba compiles it on this machine
    else:
        assert isinstance(sweep, torch.jit.ScriptFunction)  # TorchScript compiles it on this torch
    return sweep


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_compiled_sweeps_equal_the_python_sweep(pattern, cpu_sweep):
    compiled = cpu_sweep
    weight, stats = random_layer(48, 64, seed=4)
    upper = inverse_hessian_factor(stats, 0.01).upper
    p = parse_pattern(pattern)
    n, m = (p.n, p.m) if p.kind == "nm" else (0, 0)
    block = weight.t().contiguous()
    scale = torch.zeros_like(block) if m else (torch.rand(block.shape) < 0.5) / torch.diagonal(upper).unsqueeze(1)
    results = []
    for sweep in (sparsegpt_module._sweep_lazy_block, compiled):
        work, work_scale = block.clone(), scale.clone()
        errors = sweep(work, upper, work_scale, n, m, 16)
        results.append((work, work_scale, errors))
    (w1, s1, e1), (w2, s2, e2) = results
    assert torch.equal(s1 == 0, s2 == 0)
    assert torch.allclose(w1, w2, atol=1e-5) and torch.allclose(e1, e2, atol=1e-5)


def test_sweep_runs_in_python_where_torchscript_cannot_compile_it(monkeypatch):
    def no_torchscript(fn):
        raise RuntimeError("TorchScript unavailable")

    monkeypatch.setattr(torch.jit, "script", no_torchscript)
    monkeypatch.setattr(sparsegpt_module, "_compiled", None)
    monkeypatch.setattr(column_sweep, "sweep_lazy_block", lambda: None)  # no numba either
    weight, stats = random_layer(24, 48, seed=6)
    p = parse_pattern("2:4")
    expected_weight, expected_keep = textbook_sparsegpt(weight, stats.hessian(), p, 0.5, 16)
    new_weight, keep = sparsegpt(weight.clone(), stats, p, 0.5, blocksize=16)
    assert sparsegpt_module._compiled is sparsegpt_module._sweep_lazy_block
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(new_weight, expected_weight, rtol=1e-4, atol=1e-4 * float(weight.abs().max()))


def test_nth_largest_of_four_equals_a_sort():
    values = torch.randn(4, 200)
    values[:, :20] = values[0, :20]  # all four tied
    values[1, 20:40] = values[2, 20:40]  # two tied
    ordered = values.sort(dim=0, descending=True).values
    for n in range(1, 5):
        assert torch.equal(sparsegpt_module._nth_largest_of_four(values, n), ordered[n - 1])


@pytest.mark.parametrize("pattern", ["1:4", "2:4", "3:4", "2:8"])
def test_tied_saliencies_still_keep_exactly_n_per_group(pattern, cpu_sweep):
    p = parse_pattern(pattern)
    weight, stats = random_layer(24, 32, seed=5)
    weight[:, 0:3] = 0.0  # three zeros in the first group of every row: tied at the bottom
    weight[:5, 4:8] = 1.0  # identical weights in a group of some rows
    weight[5:10, 9] = weight[5:10, 10]
    new_weight, keep = sparsegpt(weight.clone(), stats, p, 0.5, blocksize=16)
    kept_per_group = keep.view(24, -1, p.m).sum(-1)
    assert (kept_per_group == p.n).all()
    assert (new_weight[~keep] == 0).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_error_energies_equal_the_error_measured_from_the_gram_matrix(pattern):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 64, generator=g) * torch.logspace(-2, 1, 64)
    x[:, [5, 40]] = 0.0  # inputs that never fire
    stats = InputStats(64, gram=True)
    stats.add_batch(x)
    weights = [torch.randn(24, 64, generator=g), torch.randn(8, 64, generator=g)]
    energies = []
    solved = sparsegpt_joint([w.clone() for w in weights], stats, parse_pattern(pattern), 0.5,
                             blocksize=16, error_energies=energies)
    assert len(energies) == 2
    for weight, (new_weight, keep), energy in zip(weights, solved, energies):
        delta = weight - new_weight * keep
        direct = float(((delta @ stats.gram) * delta).sum())
        assert energy == pytest.approx(direct, rel=1e-4)
        assert stats.relative_error(weight, error_energy=energy) == pytest.approx(
            stats.relative_error(weight, new_weight * keep), rel=1e-4)


def test_sweep_runs_in_pytorch_ops_where_numba_is_disabled(monkeypatch):
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    monkeypatch.setattr(column_sweep, "_kernel_tried", False)
    monkeypatch.setattr(column_sweep, "_kernel", None)
    assert column_sweep.sweep_lazy_block() is None
    assert sparsegpt_module._sweep_for(torch.device("cpu")) is sparsegpt_module._compiled_sweep()


def test_warm_up_compiles_the_kernel_on_a_background_thread(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setattr(column_sweep, "_kernel_tried", False)
    monkeypatch.setattr(column_sweep, "_kernel", None)
    column_sweep.warm_up()
    for thread in threading.enumerate():
        if thread.name == "sparsegpt-sweep-compile":
            thread.join(120)
    assert column_sweep._kernel is not None  # compiled
    assert column_sweep.sweep_lazy_block() is column_sweep._sweep_lazy_block


def test_a_prune_warms_its_method_up_before_the_calibration_pass(monkeypatch):
    calls = []
    monkeypatch.setattr(sparsegpt, "warm_up", lambda: calls.append("warm"))
    prune_module = importlib.import_module("workbench.prune")
    calibrate = prune_module._block0_inputs
    monkeypatch.setattr(prune_module, "_block0_inputs",
                        lambda *args, **kwargs: calls.append("calibration") or calibrate(*args, **kwargs))
    prune(tiny_model("llama"), PruneConfig(method="sparsegpt", pattern="2:4", blocksize=16, batch_size=4),
          calibration=token_batch(4, 16))
    assert calls == ["warm", "calibration"]
