"""SparseGPT (Frantar & Alistarh 2023): prune column by column and let the not yet visited
columns absorb each removal's error through the inverse Hessian (an OBS update).

The columns are visited in three nested spans. A lazy block (`blocksize`, 128 by default) is the
span whose unstructured mask is chosen at once; inside it, sub-blocks of `SUB_BLOCK` columns are
solved column by column with rank-1 updates confined to the sub-block, and each finished sub-block
passes its errors to the rest of the lazy block in one matrix product, as each lazy block does to
the rest of the layer. Only the small updates are column by column; every large one is a GEMM.
The result is the textbook per-column loop's, up to float summation order.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import torch

from workbench.patterns import Pattern, PatternError, unstructured_mask

# Columns per sub-block: small enough that a rank-1 update of the sub-block stays one cheap
# single-threaded op, large enough that the GEMM after it does most of the work.
SUB_BLOCK = 16


def _inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian, retrying with more damping.

    (Factoring the order-reversed Hessian and inverting the triangle gives the same factor with
    less work, but its different rounding flips near-tied mask choices: kept as the textbook
    computes it.)"""
    diag_mean = torch.diagonal(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = percdamp
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(hessian + damp * diag_mean * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10
    raise RuntimeError("SparseGPT: the layer's Hessian stays singular even with heavy dampening")


class _FactorCache:
    """The last inverse-Hessian factor, kept for the statistics object it came from.

    Linears fed the same input (q/k/v, gate/up) share one statistics object, so the driver's
    consecutive solves for them reuse one factorisation. The entry is keyed on the object itself
    (held weakly), its token count and the Gram matrix's in-place version counter, so statistics
    that grew or changed since are factorised afresh."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entry = None  # (weakref to stats, key, (upper factor, dead inputs))

    @staticmethod
    def _key(stats, percdamp: float, device: torch.device) -> tuple:
        gram = stats.gram
        return stats.tokens, gram._version, gram.data_ptr(), float(percdamp), str(device)

    def get(self, stats, percdamp: float, device: torch.device):
        with self._lock:
            entry = self._entry
        if entry is None or entry[0]() is not stats or entry[1] != self._key(stats, percdamp, device):
            return None
        return entry[2]

    def put(self, stats, percdamp: float, device: torch.device, value) -> None:
        try:
            ref = weakref.ref(stats)
        except TypeError:  # an object that cannot be referenced weakly is simply not cached
            return
        with self._lock:
            self._entry = (ref, self._key(stats, percdamp, device), value)


_factors = _FactorCache()


def inverse_hessian_factor(stats, percdamp: float,
                           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened inverse Hessian, mask of dead inputs) for a layer's
    input statistics; inputs that never fired get a unit diagonal so the Hessian stays invertible.
    The factor is shared by consecutive calls with the same, unchanged statistics object."""
    device = torch.device(device)
    cached = _factors.get(stats, percdamp, device)
    if cached is not None:
        return cached
    hessian = stats.hessian().to(device).clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    value = (_inverse_hessian_cholesky(hessian, percdamp), dead)
    _factors.put(stats, percdamp, device, value)
    return value


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Inside a lazy block every op is small (a row, a rank-1 update of a sub-block, a product
    with a sub-block's errors); on CPU, splitting each across threads costs more in
    synchronisation than it saves (10x slower on a busy 2-core machine). The factorisation and
    the product passing a lazy block's errors to the rest of the layer run on every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _solve_lazy_block(block: torch.Tensor, upper: torch.Tensor, pattern: Pattern, sparsity: float,
                      sub_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one lazy block of W^T in place (rows of `block` are columns of W); `upper` is the
    block's diagonal square of the inverse-Hessian factor. Returns (keep mask, errors), the
    errors being what the rest of the layer absorbs."""
    width = block.shape[0]
    diag = torch.diagonal(upper).unsqueeze(1)
    diag_sq = diag**2
    # scale[i] = 1/d_i where column i's weight goes, 0 where it stays: error of column i is
    # its removed part / d_i. d_i > 0 always, so a zero scale marks exactly the kept weights.
    if pattern.kind == "unstructured":
        # The mask for the whole lazy block is chosen up front from the OBS saliency.
        keep = unstructured_mask(block**2 / diag_sq, sparsity)
        scale = torch.where(keep, 0.0, 1.0 / diag)
    else:
        scale = (1.0 / diag).expand_as(block).contiguous()  # each N:M group zeroes its kept
    errors = torch.empty_like(block)
    # Row views made once: indexing in the loop below is a large share of its cost.
    columns, column_errors, column_scales, upper_rows = (block.unbind(0), errors.unbind(0),
                                                         scale.unbind(0), upper.unbind(0))
    for start in range(0, width, sub_block):
        end = min(start + sub_block, width)
        for i in range(start, end):
            if pattern.kind == "nm" and (i - start) % pattern.m == 0:
                # N:M groups are chosen on the weights as updated by every earlier column.
                group = slice(i, i + pattern.m)
                saliency = block[group].square().div_(diag_sq[group])
                kept = torch.topk(saliency, pattern.n, dim=0).indices
                scale[group].scatter_(0, kept, 0.0)
            torch.mul(columns[i], column_scales[i], out=column_errors[i])
            if i + 1 < end:
                block[i + 1:end].addr_(upper_rows[i][i + 1:end], column_errors[i], alpha=-1.0)
        if end < width:
            block[end:].addmm_(upper[start:end, end:].t(), errors[start:end], alpha=-1.0)
    if pattern.kind == "nm":
        keep = scale == 0
    return keep, errors


def sparsegpt(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float,
              blocksize: int = 128, percdamp: float = 0.01,
              **_) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) of `weight` pruned by SparseGPT with lazy blocks of `blocksize`
    columns; N:M groups never straddle two lazy blocks."""
    if pattern.kind not in ("unstructured", "nm"):
        raise PatternError(f"SparseGPT prunes element-wise patterns, not {pattern}")
    upper, dead = inverse_hessian_factor(stats, percdamp, weight.device)
    # W^T, so that a column of W is a contiguous row and its rank-1 update one BLAS call.
    Wt = weight.t().float().contiguous()
    Wt[dead] = 0.0

    cols = Wt.shape[0]
    sub_block = SUB_BLOCK
    if pattern.kind == "nm":
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
        sub_block = max(pattern.m, sub_block // pattern.m * pattern.m)
    sub_block = min(sub_block, blocksize)
    keep_t = torch.ones_like(Wt, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        with _one_cpu_thread(Wt.device):
            keep_t[start:end], errors = _solve_lazy_block(Wt[start:end], upper[start:end, start:end],
                                                          pattern, sparsity, sub_block)
        if end < cols:
            Wt[end:].addmm_(upper[start:end, end:].t(), errors, alpha=-1.0)
    Wt[~keep_t] = 0.0
    return Wt.t().contiguous(), keep_t.t().contiguous()
