"""The blocked SparseGPT solve against the textbook per-column loop, and the shared factor."""

import pytest
import torch

from workbench.methods.sparsegpt import inverse_hessian_factor, sparsegpt
from workbench.patterns import parse_pattern
from workbench.stats import InputStats


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
    assert not torch.allclose(grown[0], first[0])
    _, other = random_layer(8, 32, seed=3)  # equal values, another object: not trusted as equal
    assert inverse_hessian_factor(other, 0.01) is not grown


def test_thread_count_is_restored():
    weight, stats = random_layer(16, 32, seed=4)
    before = torch.get_num_threads()
    sparsegpt(weight, stats, parse_pattern("2:4"), 0.5, blocksize=16)
    assert torch.get_num_threads() == before
