"""SparseGPT (Frantar & Alistarh 2023): prune column by column and let the not yet visited
columns absorb each removal's error through the inverse Hessian (an OBS update).

The columns are visited in three nested spans. A lazy block (`blocksize`, 128 by default) is the
span whose unstructured mask is chosen at once; inside it, sub-blocks of `SUB_BLOCK` columns are
solved column by column with rank-1 updates confined to the sub-block, and each finished sub-block
passes its errors to the rest of the lazy block in one matrix product, as each lazy block does to
the rest of the layer. Only the small updates are column by column (compiled: numba on CPU,
TorchScript elsewhere); every large one is a GEMM. The result is the textbook per-column loop's,
up to float summation order.

Layers fed the same input (q/k/v, gate/up) share one Hessian, and the sweep treats every output
row on its own: `sparsegpt_joint` solves them as one matrix stacked along the output dimension,
one pass over the columns with larger products, unstructured masks still chosen per layer.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager

import torch

from workbench.methods import column_sweep
from workbench.methods.inverse_hessian import InverseHessianFactor, inverse_hessian_factor
from workbench.patterns import Pattern, PatternError, unstructured_mask

__all__ = ["InverseHessianFactor", "inverse_hessian_factor", "sparsegpt", "sparsegpt_joint"]

log = logging.getLogger(__name__)

# Columns per sub-block: small enough that a rank-1 update of the sub-block stays one cheap
# single-threaded op, large enough that the GEMM after it does most of the work.
SUB_BLOCK = 16


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


def _nth_largest_of_four(values: torch.Tensor, n: int) -> torch.Tensor:
    """The n-th largest of the four rows of `values`, element-wise: a sorting network's min/max
    ops, where `topk` down four rows costs about ten times more on wide layers."""
    a, b, c, d = values.unbind(0)
    high_ab, low_ab = torch.maximum(a, b), torch.minimum(a, b)
    high_cd, low_cd = torch.maximum(c, d), torch.minimum(c, d)
    if n == 1:
        return torch.maximum(high_ab, high_cd)
    if n == 2:
        return torch.maximum(torch.minimum(high_ab, high_cd), torch.maximum(low_ab, low_cd))
    if n == 3:
        return torch.minimum(torch.maximum(low_ab, low_cd), torch.minimum(high_ab, high_cd))
    return torch.minimum(low_ab, low_cd)


def _choose_group(saliency: torch.Tensor, inverse_diag: torch.Tensor, n: int, group_scale: torch.Tensor) -> None:
    """Write an N:M group's scale rows: 1/d_i for the m - n lowest saliencies of each weight row,
    0 for the n kept. Groups of four compare against the n-th largest value, unless a tie there
    would keep more than n; those, and other group sizes, take a `topk`."""
    m = saliency.shape[0]
    if m == 4 and not saliency.is_meta:  # a meta tensor (shapes only) has no count to read
        pruned = saliency < _nth_largest_of_four(saliency, n)
        if int(pruned.sum()) == (m - n) * saliency.shape[1]:  # at most m - n per row, so exactly
            torch.mul(pruned, inverse_diag, out=group_scale)
            return
    kept = torch.topk(saliency, n, dim=0).indices
    group_scale.copy_(inverse_diag.expand_as(saliency))
    group_scale.scatter_(0, kept, 0.0)


def _sweep_lazy_block(block: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, n: int, m: int,
                      sub_block: int) -> torch.Tensor:
    """The column-by-column sweep of one lazy block of W^T, in place (rows of `block` are columns
    of W): an error row and a rank-1 update per column, a choice per N:M group, and each finished
    sub-block's errors passed to the rest of the lazy block in one product. Returns the errors.

    `scale[i]` is 1/d_i where column i's weight goes and 0 where it stays, given for an
    unstructured mask (`m` = 0) and written group by group as the sweep chooses N:M groups.
    Thousands of small ops per layer: compiled by TorchScript (`_compiled_sweep`) off CPU and
    where numba is missing; on CPU numba's kernel runs instead (`_sweep_for`)."""
    width = block.shape[0]
    diag = torch.diagonal(upper).unsqueeze(1)
    inverse_diag = 1.0 / diag
    diag_sq = diag * diag
    errors = torch.empty_like(block)
    # row views made once: slicing in the loop is a large share of its cost
    columns, column_errors, column_scales, upper_rows = \
        block.unbind(0), errors.unbind(0), scale.unbind(0), upper.unbind(0)
    for start in range(0, width, sub_block):
        end = min(start + sub_block, width)
        for i in range(start, end):
            if m > 0 and (i - start) % m == 0:
                # N:M groups are chosen on the weights as updated by every earlier column.
                _choose_group(block[i:i + m].square() / diag_sq[i:i + m], inverse_diag[i:i + m], n,
                              scale[i:i + m])
            torch.mul(columns[i], column_scales[i], out=column_errors[i])
            if i + 1 < end:
                block[i + 1:end].addr_(upper_rows[i][i + 1:end], column_errors[i], alpha=-1.0)
        if end < width:
            block[end:].addmm_(upper[start:end, end:].t(), errors[start:end], alpha=-1.0)
    return errors


_compiled = None
_compiled_lock = threading.Lock()


def _compiled_sweep():
    """`_sweep_lazy_block` compiled by TorchScript, once per process. In Python each of its small
    ops costs more to dispatch than to run, holding the GIL throughout, so the driver's
    side-by-side solves queued on each other (two threads took 3x one thread's time for twice
    the work); TorchScript runs the loop without the GIL, at 0.6-0.9x Python's per-op cost. Where
    TorchScript cannot compile it (no source files, a torch without TorchScript), the Python
    function runs: same results, slower."""
    global _compiled
    with _compiled_lock:
        if _compiled is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's notice
                    _compiled = torch.jit.script(_sweep_lazy_block)
            except Exception as exc:  # noqa: BLE001 -- any compile failure leaves the Python loop
                log.debug("SparseGPT sweep runs in Python: TorchScript failed (%s)", exc)
                _compiled = _sweep_lazy_block
    return _compiled


def _sweep_for(device: torch.device):
    """The lazy-block sweep for tensors on `device`: numba's compiled one on CPU
    (`workbench.methods.column_sweep`), else PyTorch ops compiled by TorchScript."""
    if device.type == "cpu":
        compiled = column_sweep.sweep_lazy_block()
        if compiled is not None:
            return compiled
    return _compiled_sweep()


def _solve_lazy_block(block: torch.Tensor, upper: torch.Tensor, pattern: Pattern, sparsity: float,
                      sub_block: int, layers: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one lazy block of W^T in place (rows of `block` are columns of W); `upper` is the
    block's diagonal square of the inverse-Hessian factor. Returns (keep mask, errors), the
    errors being what the rest of the layer absorbs. `layers` are the column spans of `block`
    holding each stacked layer: an unstructured mask is chosen within each layer's span."""
    if pattern.kind == "unstructured":
        # The mask for the whole lazy block is chosen up front from the OBS saliency, per layer.
        diag = torch.diagonal(upper).unsqueeze(1)
        saliency = block**2 / diag**2
        keep = torch.empty_like(block, dtype=torch.bool)
        for span in layers:
            keep[:, span] = unstructured_mask(saliency[:, span], sparsity)
        # 1/d_i where the weight goes: its error is its removed part / d_i. d_i > 0 always, so a
        # zero scale marks exactly the kept weights.
        scale = torch.logical_not(keep) * (1.0 / diag)  # bool masks: `where` is 3x slower here
        errors = _sweep_for(block.device)(block, upper, scale, 0, 0, sub_block)
        return keep, errors
    scale = torch.empty_like(block)
    errors = _sweep_for(block.device)(block, upper, scale, pattern.n, pattern.m, sub_block)
    return torch.logical_not(scale.bool()), errors


def sparsegpt(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float,
              blocksize: int = 128, percdamp: float = 0.01,
              **_) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) of `weight` pruned by SparseGPT with lazy blocks of `blocksize`
    columns; N:M groups never straddle two lazy blocks."""
    return sparsegpt_joint([weight], stats, pattern, sparsity, blocksize=blocksize, percdamp=percdamp)[0]


def sparsegpt_joint(weights: list[torch.Tensor], stats, pattern: Pattern, sparsity: float,
                    blocksize: int = 128, percdamp: float = 0.01, error_energies: list | None = None,
                    **_) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(new weight, keep mask) per layer of `weights`, layers fed the same input (one `stats`),
    solved as one matrix stacked along the output dimension: the OBS sweep treats every output
    row on its own, so one pass over the columns serves all of them with larger products. An
    unstructured mask is still chosen per layer (in each lazy block, among that layer's
    weights), so each result equals `sparsegpt` on that layer alone, up to float summation
    order.

    With `error_energies` (a list), each layer's ||(W - W') X||^2 over the calibration tokens is
    appended to it, read off the sweep instead of a product with X^T X: each column's error row
    e is its removed part / d, and W - W' = E U, so sum(E^2) = tr((W - W') (H + damping I)
    (W - W')^T); the damping's share is subtracted."""
    if pattern.kind not in ("unstructured", "nm"):
        raise PatternError(f"SparseGPT prunes element-wise patterns, not {pattern}")
    if not weights:
        return []
    widths = {w.shape[1] for w in weights}
    if len(widths) != 1:
        raise ValueError(f"a joint SparseGPT solve needs layers of one input width, got {sorted(widths)}")
    factor = inverse_hessian_factor(stats, percdamp, weights[0].device)
    upper, dead = factor.upper, factor.dead
    # W^T, so that a column of W is a contiguous row and its rank-1 update one BLAS call.
    layers, offset = [], 0
    for w in weights:
        layers.append(slice(offset, offset + w.shape[0]))
        offset += w.shape[0]
    Wt = torch.cat([w.t().to(torch.float32) for w in weights], dim=1)  # a new tensor, even for one layer
    Wt[dead] = 0.0

    cols = Wt.shape[0]
    sub_block = SUB_BLOCK
    if pattern.kind == "nm":
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
        sub_block = max(pattern.m, sub_block // pattern.m * pattern.m)
    sub_block = min(sub_block, blocksize)
    keep_t = torch.ones_like(Wt, dtype=torch.bool)
    error_sq = torch.zeros(offset, dtype=torch.float64, device=Wt.device)  # sum(E^2) per output row
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        with _one_cpu_thread(Wt.device):
            keep_t[start:end], errors = _solve_lazy_block(Wt[start:end], upper[start:end, start:end],
                                                          pattern, sparsity, sub_block, layers)
            if error_energies is not None:
                error_sq += errors.square().sum(0)
        if end < cols:
            Wt[end:].addmm_(upper[start:end, end:].t(), errors, alpha=-1.0)
    Wt.mul_(keep_t)  # a boolean-indexed fill costs 3x more
    # transposed back in one piece each (3x faster than layer by layer); the layers are row spans
    new_weights, keeps = Wt.t().contiguous(), keep_t.t().contiguous()
    results = [(new_weights, keeps)] if len(layers) == 1 else \
        [(new_weights[span].clone(), keeps[span].clone()) for span in layers]  # no shared storage
    if error_energies is not None:
        has_dead = bool(dead.any())
        for w, span in zip(weights, layers):
            change = w.float() - new_weights[span]
            if has_dead:
                change[:, dead] = 0.0  # X is 0 there: no output error
            # per-row sums in fp32, rows added in fp64: the subtraction below can cancel most digits
            change_sq = torch.linalg.vector_norm(change, dim=1).double().square().sum()
            in_h = float(error_sq[span].sum() - float(factor.damping) * change_sq)
            error_energies.append(max(in_h, 0.0) * max(stats.tokens, 1))  # H = X^T X / tokens
    return results


sparsegpt.solve_joint = sparsegpt_joint  # how the driver finds the stacked solve of a method
sparsegpt.warm_up = column_sweep.warm_up  # and what to start before the calibration pass
