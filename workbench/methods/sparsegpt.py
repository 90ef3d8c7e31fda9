"""SparseGPT (Frantar & Alistarh 2023): prune column by column and let the not yet visited
columns absorb each removal's error through the inverse Hessian (an OBS update).

The columns are visited in three nested spans. A lazy block (`blocksize`, 128 by default) is the
span whose unstructured mask is chosen at once; inside it, sub-blocks of `SUB_BLOCK` columns are
solved column by column with rank-1 updates confined to the sub-block, and each finished sub-block
passes its errors to the rest of the lazy block in one matrix product, as each lazy block does to
the rest of the layer. Only the small updates are column by column; every large one is a GEMM.
The result is the textbook per-column loop's, up to float summation order.

Layers fed the same input (q/k/v, gate/up) share one Hessian, and the sweep treats every output
row on its own: `sparsegpt_joint` solves them as one matrix stacked along the output dimension,
one pass over the columns with larger products, unstructured masks still chosen per layer.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager

import torch

from workbench.patterns import Pattern, PatternError, unstructured_mask

# Columns per sub-block: small enough that a rank-1 update of the sub-block stays one cheap
# single-threaded op, large enough that the GEMM after it does most of the work.
SUB_BLOCK = 16


def _inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float,
                              refill: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian, retrying with more damping.

    Computed in the storage of `hessian`, which is overwritten and returned: an 11008-wide
    Hessian is 0.45 GiB in fp32, and the out-of-place chain (identity, damped sum, Cholesky
    factor, inverse, upper factor) held five of them at once. A failed attempt leaves the storage
    half-factorised; `refill(hessian)` writes the Hessian back before the next one. Same values
    as the out-of-place chain, bit for bit.

    (Factoring the order-reversed Hessian and inverting the triangle gives the same factor with
    less work, but its different rounding flips near-tied mask choices: kept as the textbook
    computes it.)"""
    diag_mean = torch.diagonal(hessian).mean()
    info = torch.zeros((), dtype=torch.int32, device=hessian.device)
    damp = percdamp
    for attempt in range(6):
        if attempt:
            refill(hessian)
        torch.diagonal(hessian).add_(damp * diag_mean)
        torch.linalg.cholesky_ex(hessian, out=(hessian, info))
        if not _failed(info):
            torch.cholesky_inverse(hessian, out=hessian)
            torch.linalg.cholesky_ex(hessian, upper=True, out=(hessian, info))
            if not _failed(info):
                return hessian
        damp *= 10
    raise RuntimeError("SparseGPT: the layer's Hessian stays singular even with heavy dampening")


def _failed(info: torch.Tensor) -> bool:
    """Whether a `cholesky_ex` failed; a meta-device run (shapes only) has no values to check."""
    return info.device.type != "meta" and int(info) != 0


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
            # the factor goes with its statistics: a driver that drops a block's statistics
            # frees the factor too (an 11008-wide one is 0.45 GiB in fp32)
            ref = weakref.ref(stats, self._forget)
        except TypeError:  # an object that cannot be referenced weakly is simply not cached
            return
        with self._lock:
            self._entry = (ref, self._key(stats, percdamp, device), value)

    def _forget(self, ref) -> None:
        with self._lock:
            if self._entry is not None and self._entry[0] is ref:
                self._entry = None


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
    gram = stats.gram
    if gram is None:
        stats.hessian()  # raises, naming the problem
    hessian = torch.empty_like(gram, device=device)

    def write_hessian(out: torch.Tensor) -> None:  # into `out`, without a temporary on its device
        if out.device == gram.device:
            stats.hessian(out=out)
        else:
            out.copy_(stats.hessian())

    write_hessian(hessian)
    dead = torch.diagonal(hessian) == 0

    def refill(out: torch.Tensor) -> None:
        write_hessian(out)
        torch.diagonal(out)[dead] = 1.0

    torch.diagonal(hessian)[dead] = 1.0
    value = (_inverse_hessian_cholesky(hessian, percdamp, refill), dead)
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
                      sub_block: int, layers: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one lazy block of W^T in place (rows of `block` are columns of W); `upper` is the
    block's diagonal square of the inverse-Hessian factor. Returns (keep mask, errors), the
    errors being what the rest of the layer absorbs. `layers` are the column spans of `block`
    holding each stacked layer: an unstructured mask is chosen within each layer's span."""
    width = block.shape[0]
    diag = torch.diagonal(upper).unsqueeze(1)
    diag_sq = diag**2
    # scale[i] = 1/d_i where column i's weight goes, 0 where it stays: error of column i is
    # its removed part / d_i. d_i > 0 always, so a zero scale marks exactly the kept weights.
    if pattern.kind == "unstructured":
        # The mask for the whole lazy block is chosen up front from the OBS saliency, per layer.
        saliency = block**2 / diag_sq
        keep = torch.empty_like(block, dtype=torch.bool)
        for span in layers:
            keep[:, span] = unstructured_mask(saliency[:, span], sparsity)
        scale = torch.logical_not(keep) * (1.0 / diag)  # bool masks: `where` is 3x slower here
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
        keep = torch.logical_not(scale.bool())
    return keep, errors


def sparsegpt(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float,
              blocksize: int = 128, percdamp: float = 0.01,
              **_) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) of `weight` pruned by SparseGPT with lazy blocks of `blocksize`
    columns; N:M groups never straddle two lazy blocks."""
    return sparsegpt_joint([weight], stats, pattern, sparsity, blocksize=blocksize, percdamp=percdamp)[0]


def sparsegpt_joint(weights: list[torch.Tensor], stats, pattern: Pattern, sparsity: float,
                    blocksize: int = 128, percdamp: float = 0.01,
                    **_) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(new weight, keep mask) per layer of `weights`, layers fed the same input (one `stats`),
    solved as one matrix stacked along the output dimension: the OBS sweep treats every output
    row on its own, so one pass over the columns serves all of them with larger products. An
    unstructured mask is still chosen per layer (in each lazy block, among that layer's
    weights), so each result equals `sparsegpt` on that layer alone, up to float summation
    order."""
    if pattern.kind not in ("unstructured", "nm"):
        raise PatternError(f"SparseGPT prunes element-wise patterns, not {pattern}")
    if not weights:
        return []
    widths = {w.shape[1] for w in weights}
    if len(widths) != 1:
        raise ValueError(f"a joint SparseGPT solve needs layers of one input width, got {sorted(widths)}")
    upper, dead = inverse_hessian_factor(stats, percdamp, weights[0].device)
    # W^T, so that a column of W is a contiguous row and its rank-1 update one BLAS call.
    layers, offset = [], 0
    for w in weights:
        layers.append(slice(offset, offset + w.shape[0]))
        offset += w.shape[0]
    Wt = torch.empty(weights[0].shape[1], offset, dtype=torch.float32, device=weights[0].device)
    for w, span in zip(weights, layers):
        Wt[:, span].copy_(w.t())
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
                                                          pattern, sparsity, sub_block, layers)
        if end < cols:
            Wt[end:].addmm_(upper[start:end, end:].t(), errors, alpha=-1.0)
    Wt.mul_(keep_t)  # a boolean-indexed fill costs 3x more
    return [(Wt[:, span].t().contiguous(), keep_t[:, span].t().contiguous()) for span in layers]


sparsegpt.solve_joint = sparsegpt_joint  # how the driver finds the stacked solve of a method
